"""Data: the Pick-a-Pic pair format and its loaders, prompt sets, the pair validation suite."""
