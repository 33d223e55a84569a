"""What the UNet is conditioned on for a batch of prompts, for SD1.5 and SDXL alike.

SD1.5 needs only the text encoder's hidden states. SDXL also takes, through `added_cond_kwargs`, the pooled
projection of its second text encoder and the six "micro-conditioning" ids (original H, W, crop top, left,
target H, W). Callers batch, index and repeat prompts; keeping the three tensors in one object means they
can never drift apart row-wise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def sdxl_time_ids(size: tuple[int, int], rows: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, 6) add_time_ids = (H, W, 0, 0, H, W): no crop, original size = target size (what the SDXL
    pipeline passes by default, and SPO's (1024, 1024, 0, 0, 1024, 1024) at 1024 px)."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(rows, 1)


@dataclass(frozen=True)
class PromptConditioning:
    """N rows of prompt conditioning; `pooled` and `time_ids` are set for SDXL only (both or neither)."""

    hidden_states: torch.Tensor  # (N, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # (N, P) text_embeds (SDXL)
    time_ids: torch.Tensor | None = None  # (N, 6) (SDXL)

    def __post_init__(self) -> None:
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("PromptConditioning: pooled and time_ids go together (SDXL) or are both None")

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def _map(self, fn) -> PromptConditioning:
        """Apply `fn` to every present tensor (all share the row dimension)."""
        return PromptConditioning(fn(self.hidden_states), *(None if x is None else fn(x)
                                                             for x in (self.pooled, self.time_ids)))

    def __getitem__(self, index: torch.Tensor | slice | int) -> PromptConditioning:
        """Rows `index`; an int keeps the row dimension (a 1-row conditioning)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda x: x[index])

    def repeat_interleave(self, repeats: int) -> PromptConditioning:
        """Each row `repeats` times in a row: the K candidates of a prompt sit next to each other."""
        return self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def repeat(self, times: int) -> PromptConditioning:
        """All rows `times` times over, as `cat([self] * times)`: both images of a pair share a prompt."""
        return PromptConditioning.cat([self] * times)

    def expand(self, rows: int) -> PromptConditioning:
        """Broadcast a 1-row conditioning (the CFG negative) to `rows` rows; `rows` rows stay as they are."""
        if len(self) not in (1, rows):
            raise ValueError(f"cannot broadcast a conditioning of {len(self)} rows to {rows}")
        return self._map(lambda x: x.expand(rows, *x.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptConditioning:
        return self._map(lambda x: x.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: Sequence[PromptConditioning]) -> PromptConditioning:
        """Rows of `parts`, in order (e.g. [uncond, cond] for one CFG batch)."""
        if len({p.is_sdxl for p in parts}) != 1:
            raise ValueError("cannot concatenate SD1.5 and SDXL conditionings")
        if not parts[0].is_sdxl:
            return PromptConditioning(torch.cat([p.hidden_states for p in parts]))
        return PromptConditioning(*(torch.cat([getattr(p, f) for p in parts])
                                    for f in ("hidden_states", "pooled", "time_ids")))

    def unet_kwargs(self) -> dict[str, object]:
        """Keyword arguments of `UNet2DConditionModel.forward` for these rows."""
        kwargs: dict[str, object] = {"encoder_hidden_states": self.hidden_states}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs
