"""The `digits` world's scores, behind the same `Scorer` interface as the published scorers.

`oracle_*`: the world's generic rater (the stand-in for Pick-a-Pic's humans), split into its terms so
the claim "aesthetics up, alignment kept" is measured term by term. `spm_reward`: the step-aware
preference model at t = 0 -- the very reward SPO optimised, so it checks training, not the result.
Both read the saved uint8 images, as the published scorers do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from spo.evaluation.image_store import from_pil


class OracleTerm:
    def __init__(self, name: str, oracle) -> None:
        self.name, self.oracle = name, oracle

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        from spo.digits.captions import caption_digit

        batch = from_pil(images)
        digits = [caption_digit(p) for p in prompts]
        term = {"oracle_aesthetic": lambda: self.oracle.aesthetic(batch),
                "oracle_alignment": lambda: self.oracle.alignment(batch, digits),
                "oracle_utility": lambda: self.oracle.utility(batch, digits)}[self.name]
        return term().double().cpu()


class SPMReward:
    name = "spm_reward"

    def __init__(self, spm) -> None:
        self.spm = spm

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        device = next(self.spm.parameters()).device
        batch = from_pil(images).to(device)
        text = self.spm.encode_text(list(prompts))
        t0 = torch.zeros(len(batch), dtype=torch.long, device=device)
        return self.spm.score(batch, text, t0).double().cpu()


def digits_scorer(name: str, *, prepared_dir: Path, spm_dir: Path, device: str):
    """The digits scorer `name` (oracle terms from prepare's oracle, spm_reward from train_spm's model)."""
    if name == "spm_reward":
        from spo.models.step_aware_preference_model import StepAwarePreferenceModel

        return SPMReward(StepAwarePreferenceModel.from_pretrained(str(Path(spm_dir) / "model")).to(device).eval())
    from spo.data.prepared_layout import ORACLE_DIR
    from spo.digits.preference_oracle import PreferenceOracle

    oracle_dir = Path(prepared_dir) / ORACLE_DIR
    if not oracle_dir.is_dir():
        from spo.config import ConfigError

        raise ConfigError(f"evaluate.scorers: {name} is a digits-world score, and {oracle_dir} does not exist "
                          "(this profile's prepare builds no oracle; use the published scorers)")
    return OracleTerm(name, PreferenceOracle.load(oracle_dir))
