"""What every scorer shares: where its weights come from (`ScorerSource`, `resolve_file`), the `Scorer`
interface, batching, image intake, and the CLIP pieces three of the five scorers are built on.

Conventions common to all scorers:
- `score(prompts, images)` returns an (N,) float64 CPU tensor, one score per (prompt, image) pair, computed
  under `torch.no_grad` in batches of `batch_size` on `device`.
- Images are RGB uint8 PIL images, as the evaluation saves them to PNG. A uint8 numpy array or tensor (HWC)
  is accepted too; float images are refused, because a HF processor rescales them by 1/255 a second time
  (an image in [0, 1] would be scored as almost black).
- HF CLIP images go through `CLIPImageProcessorPil` (the PIL pipeline: bicubic shortest-edge resize on the PIL
  image, centre crop, OpenAI mean/std), built from the saved processor config. transformers 5's default
  `CLIPImageProcessor` is torchvision-backed and differs from the PIL pipeline by up to 0.015.
- transformers 5's `CLIPModel.get_*_features` return a ModelOutput: the projected embedding is its
  `pooler_output` (`pooled`).

File resolution (`resolve_file(model, file)`), used by every scorer:
1. `file` is an existing path (absolute, or relative to the working dir) -> that path; a bare file name
   (no directory part) with a local `model` dir means `model/file` even if the working dir has one too;
2. `file` is an https URL -> downloaded once into the cache dir (`$SPO_CACHE_DIR`, else `~/.cache/spo`), under a
   temporary name renamed into place; for a URL in `KNOWN_SHA256` the sha256 is checked, on download and on
   every later use of the cached copy;
3. `model` is a local directory -> `model/file` (missing: FileNotFoundError naming that full path);
4. otherwise `huggingface_hub.hf_hub_download(model, file)`.
A `model`, `file` or `processor` that is written as a local path (absolute, `./`, `../`, `~`, or more than
one `/`) and does not exist raises FileNotFoundError naming it, instead of being sent to the hub.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

SCORER_NAMES = ("pickscore", "hpsv21", "imagereward", "aesthetic", "clip_score")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MAX_LENGTH = 77

# The LAION aesthetic predictor v2 head (christophschuhmann/improved-aesthetic-predictor, Apache-2.0, 3,714,759 B).
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
KNOWN_SHA256 = {AESTHETIC_HEAD_URL: AESTHETIC_HEAD_SHA256}


@dataclass(frozen=True)
class ScorerSource:
    """Where a scorer's weights are. Each string is a hub id or a local path."""

    model: str  # hub id or local directory
    file: str | None = None  # a file inside `model` (hub repo or dir), an absolute/relative path, or an https URL
    processor: str | None = None  # image processor/tokenizer, when it lives elsewhere (PickScore: laion ViT-H)
    tokenizer: str | None = None  # tokenizer, when it lives elsewhere (ImageReward: bert-base-uncased)
    # HPS: "ViT-H-14" (open_clip's architecture, loaded as a transformers CLIPModel) or an open_clip config JSON
    arch: str | None = None


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        """(N,) float64 on CPU, one score per (prompt, image) pair."""
        ...


# ----------------------------------------------------------------------------------------------------
# files


def cache_dir() -> Path:
    return Path(os.environ.get("SPO_CACHE_DIR") or Path.home() / ".cache" / "spo")


def looks_local(name: str) -> bool:
    """True for a string written as a filesystem path rather than a hub id ("org/name")."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name in (".", "..")
            or name.count("/") > 1 or "\\" in name)


def check_local(name: str | None, what: str) -> None:
    """FileNotFoundError naming `name` if it is written as a local path and does not exist."""
    if name is not None and not name.startswith("https://") and looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{what}: {name} does not exist")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, sha256: str | None = None) -> Path:
    """`url` downloaded once into `cache_dir()` (temporary name, then rename); checked against `sha256`."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    final = cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
            if sha256 is not None and (got := sha256_of(tmp)) != sha256:
                raise ValueError(f"{url}: sha256 {got}, expected {sha256}")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    elif sha256 is not None and (got := sha256_of(final)) != sha256:
        raise ValueError(f"{final} (cached from {url}): sha256 {got}, expected {sha256}; delete it to download again")
    return final


def resolve_file(model: str, file: str) -> Path:
    """The local path of `file` for a scorer whose weights are at `model` (see the module docstring)."""
    path = Path(file).expanduser()
    model_dir = Path(model).expanduser()
    bare = os.sep not in file and "/" not in file and not file.startswith("~")
    if path.exists() and not (bare and model_dir.is_dir()):
        return path
    if file.startswith("https://"):
        return download(file, KNOWN_SHA256.get(file))
    if model_dir.is_dir():
        inside = model_dir / file
        if not inside.exists():
            raise FileNotFoundError(f"{inside} does not exist")
        return inside
    check_local(file, "scorer file")
    check_local(model, "scorer model")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, file))


# ----------------------------------------------------------------------------------------------------
# images and batches


def to_pil_rgb(image) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 HWC array/tensor; floats are refused (see module doc)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (PIL, or HWC uint8 arrays), got {array.dtype}: convert floats in "
                        "[0, 1] with (x * 255).round() to uint8 as diffusers does")
    return Image.fromarray(array).convert("RGB")


def check_pairs(prompts: Sequence[str], images: Sequence) -> None:
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: one prompt per image")


class BatchedScorer:
    """`score` = `_score_batch` over batches of `batch_size`, under no_grad, as float64 on the CPU."""

    name: str

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.batch_size = torch.device(device), batch_size

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """(B,) scores of one batch: what each scorer defines (the abstract hook of `score`)."""
        raise NotImplementedError(f"{type(self).__name__} defines no _score_batch")

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        check_pairs(prompts, images)
        out = [torch.zeros(0, dtype=torch.float64)]
        for start in range(0, len(images), self.batch_size):
            batch = [to_pil_rgb(im) for im in images[start:start + self.batch_size]]
            out.append(self._score_batch(list(prompts[start:start + self.batch_size]), batch)
                       .detach().to("cpu", torch.float64).reshape(-1))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"


# ----------------------------------------------------------------------------------------------------
# CLIP pieces (PickScore, aesthetic, CLIP score) and the linear head (aesthetic, ImageReward)


def pooled(out) -> torch.Tensor:
    """The projected embedding from `CLIPModel.get_*_features` (a ModelOutput in transformers 5, a tensor in 4)."""
    return getattr(out, "pooler_output", out)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def linear_head(d_in: int) -> nn.Sequential:
    """The MLP head of the LAION aesthetic predictor v2 and of ImageReward: Linear layers only (the ReLUs are
    commented out upstream), Dropout is identity in eval. Keys `{0,2,4,6,7}.{weight,bias}`."""
    return nn.Sequential(nn.Linear(d_in, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def pil_image_processor(name: str):
    """`CLIPImageProcessorPil` from a processor config (hub id or dir: preprocessor_config.json or
    processor_config.json): the PIL pipeline, whatever backend the config names."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    check_local(name, "image processor")
    return CLIPImageProcessorPil.from_pretrained(name)


class ClipTowers:
    """A transformers `CLIPModel` in fp32 on `device`, its PIL image processor and its tokenizer."""

    def __init__(self, model: str, processor: str | None, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        check_local(model, "CLIP model")
        self.device = device
        self.model = CLIPModel.from_pretrained(model, dtype=torch.float32).eval().to(device)
        self.image_processor = pil_image_processor(processor or model)
        self.tokenizer = AutoTokenizer.from_pretrained(processor or model)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.pixel_values(images).to(self.device, torch.float32)
        return pooled(self.model.get_image_features(pixel_values=px)).float()

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tx = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=CLIP_MAX_LENGTH,
                            return_tensors="pt").to(self.device)
        return pooled(self.model.get_text_features(input_ids=tx["input_ids"],
                                                   attention_mask=tx["attention_mask"])).float()
