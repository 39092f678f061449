"""Unlearning: a method's loss and selection, driven per sequence by the band, with a stop rule."""
