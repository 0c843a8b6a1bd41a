"""LyCORIS LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), each half a Tucker product (hada_t1/t2) on conv layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapters.base import Adapter, FormatError, alpha_of, fp32, need


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One Tucker half as LyCORIS stores it: t (rank, rank, kh, kw), a (rank, out), b (rank, in)."""
    return torch.einsum("i j ..., j r, i p -> p r ...", t, b, a)


@dataclass(frozen=True)
class LoHa(Adapter):
    """Two low-rank products multiplied element-wise. Plain form: w?a (out, rank), w?b (rank, in·k·k);
    Tucker form (hada_t1, hada_t2): w?a (rank, out), w?b (rank, in) and t (rank, rank, kh, kw)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None
    t2: torch.Tensor | None

    kind = "LyCORIS LoHa"
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale")
    marks = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> LoHa:
        w1a, w1b, w2a, w2b = need(tensors, cls.kind, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise FormatError("a LyCORIS LoHa module has only one of hada_t1 / hada_t2")
        adapter = cls(alpha_of(tensors), tensors.get("dora_scale"), w1a, w1b, w2a, w2b, t1, t2)
        if adapter._half_shape(w1a, w1b, t1) != adapter._half_shape(w2a, w2b, t2):
            raise FormatError("the two halves of a LyCORIS LoHa module make different shapes")
        return adapter

    @staticmethod
    def _half_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
        if t is None:
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise FormatError(f"hada factors {list(a.shape)} and {list(b.shape)} do not multiply")
            return (a.shape[0], b.shape[1])
        if t.ndim < 3 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
            raise FormatError(f"hada_t {list(t.shape)} does not fit factors {list(a.shape)} and {list(b.shape)}")
        return (a.shape[1], b.shape[1], *t.shape[2:])

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._half_shape(self.w1a, self.w1b, self.t1)

    def _diff(self, device: torch.device) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (fp32(t, device) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is None or self.t2 is None:
            return (w1a @ w1b) * (w2a @ w2b)
        return _tucker(fp32(self.t1, device), w1a, w1b) * _tucker(fp32(self.t2, device), w2a, w2b)
