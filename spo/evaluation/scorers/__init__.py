"""The published text-to-image scorers for evaluation, behind one interface, loaded without network when
their files are local: PickScore, HPSv2.1, ImageReward, the LAION aesthetic predictor v2 and CLIP score.

    scorer = load_scorer("pickscore", PUBLISHED_SOURCES["pickscore"], device="cuda", batch_size=16)
    scores = scorer.score(prompts, images)   # (N,) float64 on the CPU, one per (prompt, image)

Each module's docstring states its score convention (scale, preprocessing, precision); `base` states the
conventions they share and how `ScorerSource` files are found. `spo.standins.scorers` writes tiny random
stand-ins of all five in the published layouts.
"""

from __future__ import annotations

from spo.evaluation.scorers.base import (
    AESTHETIC_HEAD_SHA256,
    AESTHETIC_HEAD_URL,
    SCORER_NAMES,
    Scorer,
    ScorerSource,
    resolve_file,
)

PUBLISHED_SOURCES: dict[str, ScorerSource] = {
    "pickscore": ScorerSource(model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv21": ScorerSource(model="xswu/HPSv2", file="HPS_v2.1_compressed.pt", arch="ViT-H-14",
                           tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "imagereward": ScorerSource(model="THUDM/ImageReward", file="ImageReward.pt", tokenizer="bert-base-uncased"),
    "aesthetic": ScorerSource(model="openai/clip-vit-large-patch14", file=AESTHETIC_HEAD_URL),
    "clip_score": ScorerSource(model="openai/clip-vit-large-patch14"),
}


def _scorer_class(name: str):
    if name == "pickscore":
        from spo.evaluation.scorers.pickscore import PickScore as cls
    elif name == "hpsv21":
        from spo.evaluation.scorers.hpsv2 import HPSv21 as cls
    elif name == "imagereward":
        from spo.evaluation.scorers.imagereward import ImageReward as cls
    elif name == "aesthetic":
        from spo.evaluation.scorers.aesthetic import AestheticScore as cls
    elif name == "clip_score":
        from spo.evaluation.scorers.clip_score import ClipScore as cls
    else:
        raise ValueError(f"unknown scorer {name!r}: expected one of {', '.join(SCORER_NAMES)}")
    return cls


def load_scorer(name: str, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> Scorer:
    """The scorer `name` (one of SCORER_NAMES) with its weights from `source`, in eval mode on `device`.
    Unknown name: ValueError; a local path or file that does not exist: FileNotFoundError naming it."""
    return _scorer_class(name).from_source(source, device=device, batch_size=batch_size)


__all__ = ["AESTHETIC_HEAD_SHA256", "AESTHETIC_HEAD_URL", "PUBLISHED_SOURCES", "SCORER_NAMES", "Scorer",
           "ScorerSource", "load_scorer", "resolve_file"]
