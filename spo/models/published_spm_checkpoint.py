"""The published SPM checkpoint format (RockeyCoss/SPO), read and written for our `StepAwarePreferenceModel`.

The published `.bin` (e.g. `sd-v1-5_step-aware_preference_model.bin`) is the state dict of the trainer's wrapper
module, whose only child is `model = HFTimeConditionedCLIPModel` (a `CLIPModel` subclass), so every key starts
with `model.`:

    published key                                                 ours
    model.<plain CLIPModel key>                                   clip.<same>
    model.t_embedder.mlp.{0,2}.{weight,bias}                      time_embedder.mlp.{0,2}.*
    model.vision_model.encoder.layers.N.adaLN_modulation.1.*      block_modulations.N.1.*   (6D: shift/scale/gate ×2)
    model.vision_model.adaLN_modulation.1.*                       pooled_modulation.1.*     (2D: shift, scale)
    model.{text,vision}_model.embeddings.position_ids             (buffers; not persistent in transformers >= 4.31)

The trainer ran transformers 4.27.3, where the `position_ids` buffers were persistent, so DeepSpeed's
zero_to_fp32 wrote them (as float32). The published loader (`load_state_dict(strict=False)`, then: no missing
key, every unexpected key equal to the model's attribute) therefore needs them under 4.27 and tolerates them
under 4.40, so we write them (int64 aranges) and accept them (any dtype, values checked) — nothing else extra.
The sinusoid has no buffer (it is recomputed each call). Forward semantics are identical to ours; see
`step_aware_preference_model.py`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spo.atomic_write import atomic_file
from spo.config import MissingPathError
from spo.models.step_aware_preference_model import StepAwarePreferenceModel

PUBLISHED_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"
PUBLISHED_FILES = {"sd15": "sd-v1-5_step-aware_preference_model.bin",
                   "sdxl": "sdxl_step-aware_preference_model.bin"}
PREFIX = "model."
TEXT_POSITION_IDS = "model.text_model.embeddings.position_ids"
VISION_POSITION_IDS = "model.vision_model.embeddings.position_ids"
CHECKPOINT_SUFFIXES = (".bin", ".safetensors")
_SHOWN = 5  # how many offending keys an error message lists


# ----------------------------------------------------------------------------------------------------
# key mapping


def published_key(name: str) -> str:
    """Our state-dict key -> the published one (see the module docstring's table)."""
    if name.startswith("clip."):
        return PREFIX + name[len("clip."):]
    if name.startswith("time_embedder."):
        return PREFIX + "t_embedder." + name[len("time_embedder."):]
    block = re.fullmatch(r"block_modulations\.(\d+)\.(.+)", name)
    if block:
        return f"{PREFIX}vision_model.encoder.layers.{block[1]}.adaLN_modulation.{block[2]}"
    if name.startswith("pooled_modulation."):
        return PREFIX + "vision_model.adaLN_modulation." + name[len("pooled_modulation."):]
    raise ValueError(f"no published name for SPM state-dict key {name!r}")


def published_key_map(spm: StepAwarePreferenceModel) -> dict[str, str]:
    """{published key: our key} for every tensor of our state dict (a bijection, checked)."""
    mapping = {published_key(name): name for name in spm.state_dict()}
    if len(mapping) != len(spm.state_dict()):
        raise AssertionError("two SPM keys map to one published key")  # a bug in published_key, not bad input
    return mapping


def _position_ids(spm: StepAwarePreferenceModel) -> dict[str, torch.Tensor]:
    """The position_ids buffers transformers 4.27 saved: aranges of (1, num_positions)."""
    text = spm.clip.text_model.embeddings.position_embedding.num_embeddings
    vision = spm.clip.vision_model.embeddings.position_embedding.num_embeddings
    return {TEXT_POSITION_IDS: torch.arange(text, dtype=torch.long)[None],
            VISION_POSITION_IDS: torch.arange(vision, dtype=torch.long)[None]}


# ----------------------------------------------------------------------------------------------------
# export / import


def published_state_dict(spm: StepAwarePreferenceModel, include_position_ids: bool = True) -> dict[str, torch.Tensor]:
    """Our SPM in the published layout (cpu, contiguous copies), as the published loader accepts it."""
    state = {published: spm.state_dict()[ours].detach().cpu().contiguous().clone()
             for published, ours in published_key_map(spm).items()}
    if include_position_ids:
        state.update(_position_ids(spm))
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > _SHOWN else shown


def _prefix_hint(state: Mapping[str, object]) -> str:
    """Say so when a checkpoint is the bare CLIP/HF layout (no `model.` wrapper prefix)."""
    if state and not any(k.startswith(PREFIX) for k in state):
        return (" — no key starts with 'model.': this is not the published wrapper layout "
                "(a bare CLIPModel / save_pretrained state dict?)")
    return ""


def _check_position_ids(spm: StepAwarePreferenceModel, given: Mapping[str, object]) -> None:
    """Optional position_ids must be the aranges the model uses (any dtype, as the published loader checks)."""
    expected = _position_ids(spm)
    for key, value in given.items():
        want = expected[key]
        if not isinstance(value, torch.Tensor) or value.shape != want.shape or not torch.equal(value.long(), want):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"SPM checkpoint key {key}: expected arange position ids of shape {tuple(want.shape)}, "
                             f"got {shape}")


def _check_tensors(state: Mapping[str, object], own: Mapping[str, torch.Tensor],
                   key_map: Mapping[str, str]) -> None:
    """Types, shapes and finiteness of every tensor, all checked before anything is copied."""
    wrong_shape = []
    for published, ours in key_map.items():
        value, target = state[published], own[ours]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"SPM checkpoint key {published}: expected a tensor, got {type(value).__name__}")
        if value.shape != target.shape:
            wrong_shape.append(f"{published}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
        elif value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"SPM checkpoint key {published}: non-finite values (NaN/inf)")
    if wrong_shape:
        raise ValueError(f"SPM checkpoint does not fit this backbone ({len(wrong_shape)} shape mismatches; "
                         f"wrong backbone for this checkpoint?): " + "; ".join(wrong_shape[:_SHOWN]))


def load_published_state_dict(spm: StepAwarePreferenceModel, state: Mapping[str, object]) -> None:
    """Load a published-layout state dict into `spm`, strictly: the key sets must match exactly (position_ids
    optional), shapes must match, tensors are cast to the model's dtypes (the SDXL file is fp16). Nothing is
    copied unless everything fits."""
    key_map = published_key_map(spm)
    optional = {TEXT_POSITION_IDS, VISION_POSITION_IDS}
    missing = sorted(set(key_map) - set(state))
    unexpected = sorted(set(state) - set(key_map) - optional)
    if missing or unexpected:
        parts = ([f"missing keys: {_listing(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_listing(unexpected)}"] if unexpected else [])
        raise ValueError("SPM checkpoint does not match the published layout: " + "; ".join(parts)
                         + _prefix_hint(state))
    _check_position_ids(spm, {k: state[k] for k in optional if k in state})
    own = spm.state_dict()
    _check_tensors(state, own, key_map)
    converted = {ours: state[published].to(dtype=own[ours].dtype) for published, ours in key_map.items()}
    spm.load_state_dict(converted, strict=True)


# ----------------------------------------------------------------------------------------------------
# files


def _looks_local(location: str) -> bool:
    """A hub repo id is exactly `owner/name`; paths, file names and anything existing are local."""
    return (location.startswith(("/", ".", "~")) or location.count("/") != 1
            or location.endswith(CHECKPOINT_SUFFIXES) or Path(location).expanduser().exists())


def resolve_checkpoint_file(location: str, architecture: str) -> Path:
    """A local `.bin`/`.safetensors` file, a local dir holding PUBLISHED_FILES[architecture], or a hub repo id
    (downloaded with HF_TOKEN from the environment) -> the checkpoint file's path."""
    if architecture not in PUBLISHED_FILES:
        raise ValueError(f"SPM architecture {architecture!r}: must be one of {sorted(PUBLISHED_FILES)}")
    filename = PUBLISHED_FILES[architecture]
    path = Path(location).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"SPM checkpoint {path}: expected a {' or '.join(CHECKPOINT_SUFFIXES)} file")
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise MissingPathError(f"SPM checkpoint directory {path} has no {filename} ({architecture})")
        return path / filename
    if _looks_local(location):
        raise MissingPathError(f"SPM checkpoint not found: {location}")
    return _download(location, filename)


def _download(repo_id: str, filename: str) -> Path:
    """hf_hub_download, with the failure (offline, no access, no such file) named in one line."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, token=os.environ.get("HF_TOKEN")))
    except Exception as err:  # the hub's errors are many classes; all mean "not available here"
        raise MissingPathError(f"SPM checkpoint {filename} not available from hub repo {repo_id}: "
                               f"{type(err).__name__}: {err}") from err


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without executing code: torch.load(weights_only) for .bin, safetensors else."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"SPM checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle with code, wrong format: all unreadable
        raise ValueError(f"SPM checkpoint {path}: cannot read: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"SPM checkpoint {path}: expected a state dict, got {type(state).__name__}")
    return state


def load_published(spm: StepAwarePreferenceModel, location: str, architecture: str) -> Path:
    """Resolve, read and load a published checkpoint into `spm`; returns the file used."""
    path = resolve_checkpoint_file(location, architecture)
    try:
        load_published_state_dict(spm, read_checkpoint(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return path


def save_published(spm: StepAwarePreferenceModel, path: str | Path) -> None:
    """Write `spm` as a published-layout checkpoint (.bin via torch.save, or .safetensors), atomically."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"SPM checkpoint {path}: expected a {' or '.join(CHECKPOINT_SUFFIXES)} file name")
    state = published_state_dict(spm)
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
