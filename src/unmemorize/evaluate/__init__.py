"""Evaluation around an unlearning run: utility (retain, general text)."""
