"""Diffusion maths: DDIM steps with log-probabilities, classifier-free guidance, sampling."""
