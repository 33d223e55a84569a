"""Build every stand-in into one directory, and the overrides that point a real profile at them (DESIGN 2).

    DIR/sd15/                 StableDiffusionPipeline (SD1.5 shape)
    DIR/sdxl/                 StableDiffusionXLPipeline (SDXL base shape)
    DIR/sdxl_vae_fp16_fix/    AutoencoderKL (madebyollin/sdxl-vae-fp16-fix shape)
    DIR/taesd/                AutoencoderTiny (madebyollin/taesd, taesdxl shape): train_spo.scoring_decoder
    DIR/pickscore/            CLIPModel + CLIPProcessor (PickScore_v1 + laion ViT-H processor shape)
    DIR/pickapic/data/*.parquet   Pick-a-Pic v1 mirror (hub layout, every column)
    DIR/scorers/<name>/       PickScore, HPSv2.1, ImageReward, aesthetic, CLIP score (published layouts)
    DIR/standins.json         manifest: which profiles, where each part is, library versions

Each part is written to a temporary sibling and renamed into place, so an interrupted build leaves either
the old part or the new one, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import diffusers
import transformers

from spo.atomic_write import atomic_dir, write_json
from spo.standins.models import (
    build_pickscore,
    build_sd15,
    build_sdxl,
    build_sdxl_fp16_fix_vae,
    build_taesd,
)
from spo.standins.pickapic_mirror import build_pickapic_mirror
from spo.standins.scorers import build_scorer_standins
from spo.tracking.progress import no_library_bars

PROFILES = ("sd15", "sdxl")
MANIFEST = "standins.json"
PARTS = {"sd15": "sd15", "sdxl": "sdxl", "sdxl_vae": "sdxl_vae_fp16_fix", "pickscore": "pickscore",
         "pickapic": "pickapic", "scorers": "scorers", "taesd": "taesd"}
NEEDS = {"sd15": ("sd15", "pickscore", "pickapic", "scorers", "taesd"),
         "sdxl": ("sdxl", "sdxl_vae", "pickscore", "pickapic", "scorers", "taesd")}
SCORER_SOURCES = "sources.json"  # in DIR/scorers: each scorer's ScorerSource, paths relative to that dir


def build_scorers(out_dir: Path, seed: int = 0) -> Path:
    """Every scorer's stand-in, and a sources.json that says where each part of each one is."""
    sources = build_scorer_standins(out_dir, seed=seed)
    relative = {name: {k: (str(Path(v).relative_to(out_dir)) if v and Path(v).is_relative_to(out_dir) else v)
                       for k, v in asdict(source).items() if v is not None} for name, source in sources.items()}
    write_json(Path(out_dir) / SCORER_SOURCES, relative)
    return Path(out_dir)


def scorer_entries(scorers_dir: Path) -> list[dict[str, str]]:
    """`evaluate.scorers` entries pointing at the stand-ins in scorers_dir (absolute paths)."""
    relative = json.loads((Path(scorers_dir) / SCORER_SOURCES).read_text())
    return [{"name": name, **{k: (str(Path(scorers_dir) / v) if (Path(scorers_dir) / v).exists() else v)
                              for k, v in parts.items()}} for name, parts in sorted(relative.items(), key=_published_order)]


def _published_order(item: tuple[str, object]) -> int:
    from spo.config import PUBLISHED_SCORERS

    return PUBLISHED_SCORERS.index(item[0]) if item[0] in PUBLISHED_SCORERS else len(PUBLISHED_SCORERS)


BUILDERS: dict[str, Callable[..., Path]] = {"sd15": build_sd15, "sdxl": build_sdxl,
                                            "sdxl_vae": build_sdxl_fp16_fix_vae, "pickscore": build_pickscore,
                                            "pickapic": build_pickapic_mirror, "scorers": build_scorers,
                                            "taesd": build_taesd}
# Sizes that make a real profile's stages finish in minutes on a CPU with the stand-ins (values as YAML/Hydra
# reads them: plain numbers and words).
CPU_OVERRIDES = {
    "model.resolution": 64, "model.dtype": "float32",
    "prepare.rows_per_shard": 10,
    "validate.min_rows": 10, "validate.max_bad_fraction": 0.2,
    "train_spm.max_steps": 4, "train_spm.batch_size": 4, "train_spm.warmup_steps": 2,
    "train_spm.mixed_precision": "fp32", "train_spm.checkpoint_every": 2,
    # SPO: 1 round of 2 prompts, the recipe's sampling (20 steps, k, MSPO's inner steps) at toy size;
    # threshold 0 because the random stand-in SPM's score gaps rarely clear the recipe's 0.3 / 0.4
    "train_spo.max_prompts": 2, "train_spo.num_epochs": 1, "train_spo.prompts_per_round": 2,
    "train_spo.prompts_per_rollout": 2, "train_spo.pairs_per_step": 8, "train_spo.pairs_per_batch": 4,
    "train_spo.threshold": 0.0, "train_spo.mixed_precision": "fp32", "train_spo.checkpoint_every": 1,
    # DPO: 2 steps of 4 pairs at the profile's beta (and the sd15 recipe's full fine-tune), checkpointed
    "train_dpo.max_steps": 2, "train_dpo.pairs_per_step": 4, "train_dpo.pairs_per_batch": 2,
    "train_dpo.mixed_precision": "fp32", "train_dpo.gradient_checkpointing": False, "train_dpo.checkpoint_every": 1,
    "train_dpo.lr_warmup_steps": 0,
    # the learning curve: its first and last point, 2 prompts, the stand-in PickScore (set below)
    "learning_curve.points": 1, "learning_curve.num_prompts": 2, "learning_curve.batch_size": 2,
    # evaluate: the protocol (DDIM 20, CFG 5) on 2 prompts; fewer bootstrap resamples
    "evaluate.num_prompts": 2, "evaluate.batch_size": 2, "evaluate.score_batch_size": 4, "evaluate.grid_prompts": 2,
    "evaluate.bootstrap_resamples": 200,
    "torch_threads": 1,
}


@dataclass(frozen=True)
class StandIns:
    """Where each stand-in is; None for a part no requested profile needs."""

    sd15: Path | None
    sdxl: Path | None
    sdxl_vae: Path | None
    pickscore: Path | None
    pickapic: Path | None
    scorers: Path | None = None  # absent from manifests written before the scorers existed
    taesd: Path | None = None  # likewise, before the scoring decoder

    def profiles(self) -> tuple[str, ...]:
        """The profiles these stand-ins can run."""
        return tuple(p for p in PROFILES if all(getattr(self, part) is not None for part in NEEDS[p]))


def _check_profiles(profiles: Iterable[str]) -> tuple[str, ...]:
    profiles = tuple(dict.fromkeys(profiles))
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise ValueError(f"stand-in profiles {list(profiles)}: expected some of {list(PROFILES)}")
    return profiles


def build_standins(out_dir: Path, profiles: Iterable[str] = PROFILES, *, seed: int = 0) -> StandIns:
    """Write the parts `profiles` need under `out_dir` (each atomically), then the manifest; return their paths."""
    out_dir = Path(out_dir).absolute()
    profiles = _check_profiles(profiles)
    wanted = {part for p in profiles for part in NEEDS[p]}
    paths: dict[str, Path | None] = {}
    for part, name in PARTS.items():
        if part not in wanted:
            paths[part] = None
            continue
        with atomic_dir(out_dir / name) as tmp, no_library_bars(tmp):
            BUILDERS[part](tmp, seed=seed)
        paths[part] = out_dir / name
    standins = StandIns(**paths)
    write_json(out_dir / MANIFEST, {
        "profiles": list(profiles), "seed": seed,
        "parts": {part: PARTS[part] for part, path in paths.items() if path is not None},
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
    })
    return standins


def read_standins(out_dir: Path) -> StandIns:
    """The stand-ins a previous `build_standins(out_dir)` wrote (from its manifest; parts are relative to it)."""
    out_dir = Path(out_dir).absolute()
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no stand-ins in {out_dir}: {MANIFEST} not found (run `spo fixtures build {out_dir}`)")
    parts = json.loads(manifest.read_text())["parts"]
    return StandIns(**{f.name: (out_dir / parts[f.name] if f.name in parts else None) for f in fields(StandIns)})


def _value(value: object) -> str:
    """A value both YAML (spo.config) and Hydra (`dvc exp run -S`) read back unchanged: paths double-quoted."""
    if value is None:
        return "null"
    if isinstance(value, Path):
        text = str(value)
        if '"' in text or "\\" in text or "'" in text:
            raise ValueError(f"stand-in path {text!r}: quotes and backslashes cannot pass through a -S override")
        return f'"{text}"'
    return str(value)


def profile_overrides(standins: StandIns, profile: str) -> list[str]:
    """`key=value` overrides (for `dvc exp run -S`, or spo.config's overrides) that run `profile` on the
    stand-ins at toy size on a CPU."""
    _check_profiles([profile])
    missing = [part for part in NEEDS[profile] if getattr(standins, part) is None]
    if missing:
        raise ValueError(f"stand-ins for profile {profile!r} lack {missing}: build them with profiles=({profile!r},)")
    models = {
        "model.base_model": getattr(standins, profile),
        "model.vae": standins.sdxl_vae if profile == "sdxl" else None,
        "model.preference_backbone": standins.pickscore,
        "model.preference_processor": standins.pickscore,
        "prepare.data_dir": standins.pickapic,
    }
    overrides = [f"{key}={_value(value)}" for key, value in {**models, **CPU_OVERRIDES}.items()]
    entries = ["{" + ", ".join(f"{k}: {_value(Path(v)) if Path(v).exists() else v}" for k, v in e.items()) + "}"
               for e in scorer_entries(standins.scorers)]
    pickscore = [e for e in entries if e.startswith("{name: pickscore")]
    return [*overrides, f"evaluate.scorers=[{', '.join(entries)}]", f"learning_curve.scorers=[{', '.join(pickscore)}]"]
