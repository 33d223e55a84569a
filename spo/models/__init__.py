"""Networks: loading the diffusion model, the step-aware preference model."""
