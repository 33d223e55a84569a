"""Training: the SPO rollout, loss and loop; step-aware preference model training."""
