"""LoRA on the UNet's attention projections (peft through diffusers' adapter API), and the two outputs a
fine-tune writes: the LoRA in diffusers' format, or a full fine-tuned UNet (OUT/unet/).

The reference model is the same UNet with the adapter disabled: no second copy in memory
(the published code kept a frozen fp16 deepcopy). The full UNet sits in the subfolder a pipeline dir has,
so a consumer (evaluate, register, `spo export --merged`) takes a trained output dir, a whole pipeline dir
or a bare UNet dir alike, and tells it from a LoRA dir by its files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from spo.config import MissingPathError, TrainDPOConfig, TrainSPOConfig
from spo.tracking.progress import no_library_bars

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
DISABLED_FILE = "disabled.json"  # in place of weights: the training stage was switched off (train_dpo.enabled)
FULL_UNET_SUBDIR = "unet"
UNET_CONFIG_FILE = "config.json"  # what `save_pretrained` writes beside a model's weights
# the pipeline class whose `save_lora_weights` writes each architecture's file (model.architecture values);
# a UNet-only file has the same keys ("unet.<module>.lora_A.weight") for both
LORA_SAVERS = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def add_lora(unet: UNet2DConditionModel, cfg: TrainSPOConfig | TrainDPOConfig) -> list[torch.nn.Parameter]:
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


def save_lora(unet: UNet2DConditionModel, out_dir: Path, architecture: str = "sd15") -> None:
    """Diffusers format, so users load it with `pipe.load_lora_weights(out_dir)` into the pipeline of
    `architecture` ("sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline).

    The adapter config (rank, alpha, targets) goes into the safetensors metadata: without it the loaders
    assume alpha = rank, and an adapter trained with alpha != rank reloads with another scale (alpha / r).
    """
    if architecture not in LORA_SAVERS:
        raise ValueError(f"save_lora: unknown architecture {architecture!r}; known: {', '.join(LORA_SAVERS)}")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set: its order follows the process's hash seed, so sort it, or the
    # same weights give another file (and another DVC hash) in every run
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}
    LORA_SAVERS[architecture].save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True,
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


def lora_weights_file(lora_dir: Path) -> Path:
    """`lora_dir`'s adapter file; a MissingPathError (one line from the `spo` command) if there is none."""
    weights = Path(lora_dir) / LORA_WEIGHTS_FILE
    if not weights.is_file():
        where = "" if Path(lora_dir).is_dir() else f" (no directory {lora_dir})"
        raise MissingPathError(f"LoRA weights not found: {weights}{where}")
    return weights


def load_lora(unet: UNet2DConditionModel, lora_dir: Path) -> None:
    """Load a LoRA saved by `save_lora` (or any diffusers-format SD1.5 / SDXL UNet LoRA) into `unet`."""
    lora_weights_file(lora_dir)
    unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHTS_FILE)


def save_full_unet(unet: UNet2DConditionModel, out_dir: Path) -> Path:
    """Write `unet` to out_dir/unet/ (safetensors); return that dir. Callers make out_dir atomic (atomic_dir)."""
    if getattr(unet, "peft_config", None):
        raise ValueError("save_full_unet: the UNet carries a LoRA adapter; save it with save_lora, "
                         "or fuse it first (spo export --merged)")
    target = Path(out_dir) / FULL_UNET_SUBDIR
    with no_library_bars():  # a local write: its bar says nothing
        unet.save_pretrained(target, safe_serialization=True)
    return target


def full_unet_dir(path: Path) -> Path:
    """The UNet dir in `path`: path/unet/ (ours, or a pipeline's), or `path` itself if it is a UNet dir."""
    path = Path(path)
    for candidate in (path / FULL_UNET_SUBDIR, path):
        if (candidate / UNET_CONFIG_FILE).is_file():
            return candidate
    raise MissingPathError(f"full UNet not found: no {FULL_UNET_SUBDIR}/{UNET_CONFIG_FILE} or {UNET_CONFIG_FILE} "
                           f"in {path}")


def load_full_unet(path: Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Load what `save_full_unet(unet, path)` wrote (or a pipeline dir's / a bare UNet dir's UNet), frozen, in eval."""
    location = full_unet_dir(path)
    with no_library_bars(str(location)):
        unet = UNet2DConditionModel.from_pretrained(location, dtype=dtype)
    return unet.requires_grad_(False).eval()
