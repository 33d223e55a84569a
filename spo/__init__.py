"""spo-pipeline: Step-by-step Preference Optimization for text-to-image diffusion models."""

__version__ = "0.1.0"
