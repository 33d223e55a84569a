"""Evaluation: paired comparisons of models on fixed prompts and seeds."""
