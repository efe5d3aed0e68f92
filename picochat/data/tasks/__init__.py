"""Tasks: sized, indexable datasets of conversations, optionally with an evaluator (one file each)."""
