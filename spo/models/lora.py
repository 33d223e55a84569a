"""LoRA on the UNet's attention projections (peft through diffusers' adapter API).

The reference model is the same UNet with the adapter disabled: no second copy in memory
(the published code kept a frozen fp16 deepcopy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from spo.config import TrainSPOConfig

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: UNet2DConditionModel, cfg: TrainSPOConfig) -> list[torch.nn.Parameter]:
    """Attach a gaussian-init LoRA (B = 0, so the UNet output is unchanged); return its fp32 params."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.lora_targets)))
    cast_training_params(unet, dtype=torch.float32)  # only the trainable (LoRA) params; the base keeps its dtype
    # a list, not a generator: the published clip_grad_norm_ got an exhausted iterator
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def adapter_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The frozen base model: the same UNet with its LoRA switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def save_lora(unet: UNet2DConditionModel, out_dir: Path) -> None:
    """Diffusers format, so users load it with `pipe.load_lora_weights(out_dir)`.

    The adapter config (rank, alpha, targets) goes into the safetensors metadata: without it the loaders
    assume alpha = rank, and an adapter trained with alpha != rank reloads with another scale (alpha / r).
    """
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set: its order follows the process's hash seed, so sort it, or the
    # same weights give another file (and another DVC hash) in every run
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    _canonical_header(Path(out_dir) / LORA_WEIGHTS_FILE)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: safetensors writes its `__metadata__` map in a
    per-process random order, so identical adapters would otherwise differ in bytes (and DVC hash).
    The format: 8-byte little-endian header length, the JSON header (padded to 8 bytes), the data."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size:])


def load_lora(unet: UNet2DConditionModel, lora_dir: Path) -> None:
    """Load a LoRA saved by `save_lora` (or any diffusers-format SD1.5 LoRA) into `unet`."""
    weights = Path(lora_dir) / LORA_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {weights}")
    unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHTS_FILE)
