"""Inputs: sets, corpora, models and tokens."""
