"""Build the scorers a config names: the published ones from their locations, the digits world's from
what `prepare` and `train_spm` wrote. Shared by `evaluate` and the training stages' learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spo.config import PUBLISHED_SCORERS, ScorerEntry


def build_scorers(entries: Sequence[ScorerEntry], *, prepared_dir: Path, spm_dir: Path | None, device: str,
                  batch_size: int) -> list:
    from spo.evaluation.digits_scorers import digits_scorer
    from spo.evaluation.scorers import ScorerSource, load_scorer

    scorers = []
    for entry in entries:
        if entry.name in PUBLISHED_SCORERS:
            source = ScorerSource(model=entry.model, file=entry.file, processor=entry.processor,
                                  tokenizer=entry.tokenizer, arch=entry.arch)
            scorers.append(load_scorer(entry.name, source, device=device, batch_size=batch_size))
        else:
            if entry.name == "spm_reward" and spm_dir is None:
                raise ValueError("scorer spm_reward needs the trained SPM (train_spm's output)")
            scorers.append(digits_scorer(entry.name, prepared_dir=Path(prepared_dir),
                                         spm_dir=Path(spm_dir) if spm_dir else Path(), device=device))
    return scorers
