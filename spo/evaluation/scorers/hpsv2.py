"""HPSv2.1 (Wu et al. 2023): `xswu/HPSv2` / `HPS_v2.1_compressed.pt`, an open_clip `ViT-H-14` (GELU) fine-tune.

Model: the checkpoint's open_clip weights (`ckpt["state_dict"]`, any DDP `module.` prefix stripped) are
renamed into transformers' `CLIPModel` -- the same network: pre-LN ViT with a class token, causal text
transformer pooled at EOT, bias-free projections, exact GELU -- and loaded strictly (every checkpoint key
used, every model weight given). Not open_clip itself: open_clip imports torchvision, and no torchvision
wheel imports beside the CPU torch build this project installs. `tests/test_scorers.py` checks the port
against open_clip's own forward where open_clip is installed. `arch` is "ViT-H-14" (the published one) or
a path to an open_clip model-config JSON (stand-ins); the LAION base weights are never downloaded.
Images: HPS's inference letterbox (`letterbox`): to a float tensor first, the longest side resized to the
model's image size (224) bicubic *on the tensor* with `antialias=ANTIALIAS` (torch's interpolate, what
torchvision's tensor resize calls; True: torchvision >= 0.17's default -- HPS calls resize without the
argument, so what the published numbers used depends on their torchvision), zero-padded centred (black,
before normalisation), OpenAI mean/std. No crop.
Text: the CLIP BPE tokenizer (`source.tokenizer`, default laion's ViT-H one, the vocabulary open_clip's
tokenizer uses), 77 tokens, truncated by the tokenizer so EOT stays.
Score: `100 * cos(image, text)` of the L2-normalised features, no logit scale. `hpsv2.score()` returns the
cosine (about 0.2-0.35); its benchmark and the papers' tables report it x100 (e.g. 26.45), and so do we.
Precision: fp16 autocast on CUDA (as the reference's `torch.cuda.amp.autocast()`, fp32 weights); fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spo.evaluation.scorers.base import (
    CLIP_MAX_LENGTH,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BatchedScorer,
    ScorerSource,
    check_local,
    normalized,
    resolve_file,
)

log = logging.getLogger(__name__)
ANTIALIAS = True
SCALE = 100.0
DEFAULT_ARCH = "ViT-H-14"
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP BPE of open_clip's ViT-H-14 tokenizer
# open_clip's ViT-H-14.json (as HPS's vendored copy and open_clip 3.x ship it)
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}


def letterbox(image: Image.Image, size: int, *, antialias: bool = ANTIALIAS) -> torch.Tensor:
    """(3, size, size) normalised tensor: HPS's `ResizeMaxSize` on the tensor, black padding, OpenAI mean/std."""
    t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = t.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        t = torch.nn.functional.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False,
                                            antialias=antialias)[0]
    ph, pw = size - nh, size - nw
    t = torch.nn.functional.pad(t, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return (t - mean) / std


def open_clip_config(arch: str) -> dict:
    """An open_clip model config: ViT-H-14's, or the JSON file `arch` names."""
    if arch == DEFAULT_ARCH:
        return VIT_H_14
    path = Path(arch).expanduser()
    if not arch.endswith(".json"):
        raise ValueError(f"hpsv21 arch {arch!r}: expected {DEFAULT_ARCH!r} or a path to an open_clip config JSON")
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {arch} does not exist")
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{arch}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return cfg


def clip_config(cfg: dict, tokenizer):
    """transformers' `CLIPConfig` of the open_clip config (GELU, LayerNorm eps 1e-5 as open_clip's defaults);
    special ids from `tokenizer`, so the text tower pools at EOT as open_clip's argmax does."""
    from transformers import CLIPConfig

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vision = {"hidden_size": v["width"], "num_hidden_layers": v["layers"], "image_size": v["image_size"],
              "patch_size": v["patch_size"], "num_attention_heads": v["width"] // v.get("head_width", 64),
              "intermediate_size": int(v["width"] * v.get("mlp_ratio", 4.0)), "hidden_act": act,
              "layer_norm_eps": 1e-5}
    text = {"hidden_size": t["width"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4.0)), "vocab_size": t["vocab_size"],
            "max_position_embeddings": t["context_length"], "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["embed_dim"])


_BLOCK = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
          ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights -> transformers `CLIPModel` names. nn.MultiheadAttention's packed in_proj is split
    into q/k/v; the (width, embed) projections that open_clip right-multiplies become Linear weights (transposed).
    A key this does not know raises KeyError naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()
        elif match := _RESBLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # weight | bias
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for a, b in _BLOCK:
                if rest.startswith(a):
                    out[prefix + b + rest[len(a):]] = value
                    break
            else:
                raise KeyError(f"HPS checkpoint key {key!r}: not an open_clip CLIP weight this loader knows")
        elif key == "attn_mask":  # open_clip 2.x's causal mask buffer: transformers builds its own
            continue
        else:
            raise KeyError(f"HPS checkpoint key {key!r}: not an open_clip CLIP weight this loader knows")
    return out


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """`ckpt["state_dict"]` (or a bare state dict) with any `module.` prefix stripped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a published file that may hold non-tensor pickles
        log.warning("%s: weights_only load failed (%s); loading it as a full pickle", path, err)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_hps_model(checkpoint: Path, arch: str, tokenizer):
    """A transformers `CLIPModel` holding the HPS checkpoint, fp32, eval; strict both ways."""
    from transformers import CLIPModel

    model = CLIPModel(clip_config(open_clip_config(arch), tokenizer))
    weights = {k: v.float() for k, v in to_transformers(load_checkpoint(Path(checkpoint))).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"HPS checkpoint {checkpoint} does not fit arch {arch}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    return model.eval()


class HPSv21(BatchedScorer):
    name = "hpsv21"

    def __init__(self, checkpoint: str | Path, arch: str = DEFAULT_ARCH, tokenizer: str = DEFAULT_TOKENIZER, *,
                 device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import AutoTokenizer

        super().__init__(device, batch_size)
        check_local(tokenizer, "hpsv21 tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.arch = arch
        self.model = load_hps_model(Path(checkpoint), arch, self.tokenizer).to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)

    @classmethod
    def from_source(cls, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> HPSv21:
        check_local(source.model, "hpsv21 model")
        checkpoint = resolve_file(source.model, source.file or "HPS_v2.1_compressed.pt")
        return cls(checkpoint, source.arch or DEFAULT_ARCH, source.tokenizer or DEFAULT_TOKENIZER, device=device,
                   batch_size=batch_size)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([letterbox(im, self.image_size) for im in images])

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH,
                              return_tensors="pt")["input_ids"]

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.pixel_values(images).to(self.device)
        ids = self.token_ids(prompts).to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            i = self.model.get_image_features(pixel_values=px)
            t = self.model.get_text_features(input_ids=ids)
        i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
        return SCALE * (normalized(i.float()) * normalized(t.float())).sum(-1)
