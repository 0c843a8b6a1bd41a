"""LyCORIS full difference (`diff`, `diff_b`) and normalisation-layer updates (`w_norm`, `b_norm`):
the file holds ΔW itself, so there is nothing smaller to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapters.base import Adapter, fp32


@dataclass(frozen=True)
class Full(Adapter):
    """ΔW as stored; LyCORIS applies no alpha to it."""

    diff: torch.Tensor

    kind = "LyCORIS full difference"
    suffixes = ("diff", "diff_b", "w_norm", "b_norm")
    marks = ("diff", "diff_b", "w_norm", "b_norm")

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> Full:
        """The weight's part; a bias's part (diff_b, b_norm) is read by `bias`."""
        return cls(None, None, tensors.get("diff", tensors.get("w_norm")))

    @classmethod
    def bias(cls, tensors: dict[str, torch.Tensor]) -> Full | None:
        diff = tensors.get("diff_b", tensors.get("b_norm"))
        return None if diff is None else cls(None, None, diff)

    @property
    def rank(self) -> None:
        return None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def _diff(self, device: torch.device) -> torch.Tensor:
        return fp32(self.diff, device)
