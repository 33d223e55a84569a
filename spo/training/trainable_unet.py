"""What a preference fine-tune trains and what it is measured against: a LoRA on the UNet with the
LoRA-disabled UNet as the frozen reference, or (full fine-tune) every UNet weight against a frozen copy.

SPO and Diffusion-DPO share it, so both baselines of a comparison start from the same adapter and the
same memory options.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from spo.config import TrainDPOConfig, TrainSPOConfig
from spo.models.diffusion_model import DiffusionModel
from spo.models.lora import adapter_disabled, add_lora

ReferenceFn = Callable[[], AbstractContextManager[UNet2DConditionModel]]


def lora_reference(model: DiffusionModel) -> ReferenceFn:
    """The frozen base is the policy UNet with its LoRA off: no second copy in memory."""
    return lambda: adapter_disabled(model.unet)


def frozen_copy_reference(unet: UNet2DConditionModel) -> ReferenceFn:
    """Full fine-tuning: the reference is a frozen copy of the UNet as it was before training."""
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()

    @contextmanager
    def use() -> Iterator[UNet2DConditionModel]:
        yield frozen
    return use


def prepare_unet(model: DiffusionModel,
                 cfg: TrainSPOConfig | TrainDPOConfig) -> tuple[list[torch.nn.Parameter], ReferenceFn | None]:
    """The trainable parameters and the reference (None: the LoRA-disabled UNet), after the memory options."""
    if cfg.attention == "eager":
        model.unet.set_attn_processor(AttnProcessor())
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if not cfg.full_finetune:
        return add_lora(model.unet, cfg), None
    reference = frozen_copy_reference(model.unet)  # in the model's dtype, before the fp32 master weights
    model.unet.to(torch.float32).requires_grad_(True)
    return [p for p in model.unet.parameters()], reference
