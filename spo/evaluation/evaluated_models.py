"""What each `evaluate.models` entry samples with: a base pipeline, optionally a LoRA or a full UNet.

Entries name hub ids or local dirs, so the paper's released checkpoints (a LoRA repo, a full pipeline, the
public Diffusion-DPO UNet) score under our protocol without training. Hub ids are fetched here, in the
main process, once; worker processes then load local dirs only. Each model also gets a fingerprint of what
it is (locations, and the content of local weight files) so cached images of a changed model are never
reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spo.config import Config, ConfigError, EvaluatedModel, MissingPathError
from spo.diffusion.cpu_workers import SamplerSpec
from spo.evaluation.scorers.base import looks_local
from spo.models.diffusion_model import resolve_model_location
from spo.models.lora import DISABLED_FILE, FULL_UNET_SUBDIR, LORA_WEIGHTS_FILE, UNET_CONFIG_FILE, full_unet_dir

log = logging.getLogger(__name__)

SMALL_FILE = 256 * 2**20  # weight files up to this size are fingerprinted by content, larger by size + mtime


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    spec: SamplerSpec
    description: str  # for the report: where each part comes from
    fingerprint: str


def _is_local(location: str) -> bool:
    return Path(location).expanduser().exists() or looks_local(location)


def _hub_snapshot(repo_id: str, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated: name the entry and the repo
        raise MissingPathError(f"{what}: cannot fetch hub repo {repo_id!r} ({type(err).__name__}: {err})") from err


def lora_location(location: str, what: str) -> Path:
    """A LoRA dir holding pytorch_lora_weights.safetensors: a local dir, or a hub repo's snapshot."""
    path = Path(location).expanduser()
    if not _is_local(location):
        path = _hub_snapshot(location, ["*.safetensors", "*.json"], what)
    if not (path / LORA_WEIGHTS_FILE).is_file():
        raise MissingPathError(f"{what}: LoRA weights not found: {path / LORA_WEIGHTS_FILE}")
    return path


def unet_location(location: str, what: str) -> Path:
    """A UNet dir: ours (dir/unet/), a pipeline's (dir/unet/), a bare UNet dir, or a hub repo's unet/."""
    if _is_local(location):
        try:
            return full_unet_dir(Path(location).expanduser())
        except MissingPathError as err:
            raise MissingPathError(f"{what}: {err}") from None
    snapshot = _hub_snapshot(location, [f"{FULL_UNET_SUBDIR}/*", UNET_CONFIG_FILE, "*.safetensors"], what)
    return full_unet_dir(snapshot)


def _files_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for root in paths for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}".encode())
        if stat.st_size <= SMALL_FILE:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def run_output_disabled(run_dir: Path | None) -> bool:
    """The training stage was switched off (train_dpo.enabled: false): it wrote a marker, not a model."""
    return run_dir is not None and (Path(run_dir) / "lora" / DISABLED_FILE).is_file()


def run_output_location(name: str, run_dir: Path | None, what: str) -> tuple[str | None, str | None]:
    """(lora_dir, unet_dir) of this run's trained model: train_spo/train_dpo write out_dir/lora (a LoRA)
    or, with full_finetune, out_dir/lora/unet (a UNet)."""
    if run_dir is None:
        raise MissingPathError(f"{what}: run_output {name} needs the stage's --{name}-dir")
    lora = Path(run_dir) / "lora"
    if (lora / FULL_UNET_SUBDIR / UNET_CONFIG_FILE).is_file():
        return None, str(lora / FULL_UNET_SUBDIR)
    if (lora / LORA_WEIGHTS_FILE).is_file():
        return str(lora), None
    raise MissingPathError(f"{what}: no trained model in {run_dir}: neither {lora / LORA_WEIGHTS_FILE} "
                           f"nor {lora / FULL_UNET_SUBDIR / UNET_CONFIG_FILE}")


def resolve_models(cfg: Config, base_location: str, run_dirs: dict[str, Path | None], *,
                   device: str) -> list[ResolvedModel]:
    """Every `evaluate.models` entry as what a sampler loads, in config order (the first is the baseline)."""
    ev = cfg.evaluate
    dtype = "float32" if device == "cpu" else cfg.model.dtype  # fp16 on CPU is slow and not what a GPU does
    resolved = []
    for index, entry in enumerate(ev.models):
        if entry.run_output is not None and run_output_disabled(run_dirs.get(entry.run_output)):
            log.warning("evaluate.models[%d] (%s): train_%s is disabled in this run: left out", index, entry.name,
                        entry.run_output)
            continue
        resolved.append(_resolve(entry, f"evaluate.models[{index}] ({entry.name})", cfg, base_location,
                                 run_dirs, device, dtype))
    if len(resolved) < 2:
        raise ConfigError(f"evaluate.models: {len(resolved)} model(s) left to compare once the disabled training "
                          "stages' outputs are left out; need at least 2")
    return resolved


def _resolve(entry: EvaluatedModel, what: str, cfg: Config, base_location: str, run_dirs: dict[str, Path | None],
             device: str, dtype: str) -> ResolvedModel:
    base = resolve_model_location(entry.base or base_location, f"{what} base")
    lora, unet = None, None
    if entry.run_output is not None:
        lora, unet = run_output_location(entry.run_output, run_dirs.get(entry.run_output), what)
    elif entry.lora is not None:
        lora = str(lora_location(entry.lora, what))
    elif entry.unet is not None:
        unet = str(unet_location(entry.unet, what))
    ev = cfg.evaluate
    spec = SamplerSpec(base, lora, cfg.model.resolution, ev.num_inference_steps, ev.guidance_scale, ev.eta,
                       vae_dir=cfg.model.vae, device=device, unet_dir=unet, dtype=dtype)
    local = [Path(p) for p in (base, lora, unet, cfg.model.vae) if p and Path(p).exists()]
    identity = repr((base, entry.lora, entry.unet, entry.run_output, cfg.model.vae, cfg.model.resolution,
                     ev.num_inference_steps, ev.guidance_scale, ev.eta, dtype))
    fingerprint = hashlib.sha256(f"{identity}|{_files_digest(local)}".encode()).hexdigest()[:16]
    parts = [f"base {entry.base or base_location}"]
    if entry.run_output:
        parts.append(f"this run's {entry.run_output} {'UNet' if unet else 'LoRA'}")
    elif entry.lora:
        parts.append(f"LoRA {entry.lora}")
    elif entry.unet:
        parts.append(f"UNet {entry.unet}")
    return ResolvedModel(entry.name, spec, " + ".join(parts), fingerprint)
