"""spo-pipeline: Step-by-step Preference Optimization for text-to-image diffusion models."""

import os

# libgomp's default busy-waiting makes multi-thread torch many times slower on small ops whenever another
# process holds a core (measured: a tiny-UNet rollout 2.2 s vs 70 s); passive waiting costs nothing on
# free cores. libgomp reads this when torch loads, so it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
