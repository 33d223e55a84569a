"""spo-pipeline: Step-by-step Preference Optimization for text-to-image diffusion models."""

import logging
import os

# libgomp's default busy-waiting makes multi-thread torch many times slower on small ops whenever another
# process holds a core (measured: a tiny-UNet rollout 2.2 s vs 70 s); passive waiting costs nothing on
# free cores. libgomp reads this when torch loads, so it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers 5 warns, on every process start, that `CLIPImageProcessor` (imported by diffusers) falls
    back to its PIL implementation without torchvision. That fallback is what we use on purpose (PIL-exact
    preprocessing, no torchvision wheel to match the CPU torch build), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())

__version__ = "0.1.0"
