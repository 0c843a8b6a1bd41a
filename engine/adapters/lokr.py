"""LyCORIS LoKr: ΔW = kron(w1, w2), each side full or split in two (w?_a @ w?_b), w2 Tucker with lokr_t2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapters.base import Adapter, FormatError, alpha_of, fp32


@dataclass(frozen=True)
class LoKr(Adapter):
    """A Kronecker product. w1 (a, c) or w1_a (a, rank) @ w1_b (rank, c); w2 (b, d[, kh, kw]) or
    w2_a (b, rank) @ w2_b (rank, d[, kh, kw]), or with lokr_t2 (rank, rank, kh, kw) the Tucker form
    w2_a (rank, b), w2_b (rank, d). ΔW is (a·b, c·d[, kh, kw]). Alpha is divided by the rank of a
    split side (w1's first) and not applied when both sides are full, as LyCORIS's LokrModule
    trains it (scale = alpha / lora_dim) and ComfyUI applies it: the rank is read from w?_b's first
    axis. (lycoris.functional.lokr.diff_weight and LyCORIS's file loader read w2_a's second axis,
    which in the Tucker layout is b, not the rank; the tests follow the module that made the file.)"""

    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    t2: torch.Tensor | None

    kind = "LyCORIS LoKr"
    suffixes = (
        *("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        *("alpha", "dora_scale"),
    )
    marks = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> LoKr:
        get = tensors.get
        adapter = cls(
            alpha_of(tensors),
            get("dora_scale"),
            *(get(f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
        )
        sides = (("w1", adapter.w1, adapter.w1a, adapter.w1b), ("w2", adapter.w2, adapter.w2a, adapter.w2b))
        for side, full, a, b in sides:
            if full is None and (a is None or b is None):
                raise FormatError(f"a LyCORIS LoKr module has neither lokr_{side} nor both lokr_{side}_a / _b")
        if (
            adapter.t2 is not None
            and adapter.w2 is None
            and tuple(adapter.t2.shape[:2])
            != (
                adapter.w2a.shape[0],
                adapter.w2b.shape[0],
            )
        ):
            raise FormatError(f"lokr_t2 {list(adapter.t2.shape)} does not fit lokr_w2_a / lokr_w2_b")
        adapter.shape  # noqa: B018 - every factor pair must multiply; raises FormatError if not
        return adapter

    @property
    def rank(self) -> int | None:
        if self.w1 is None and self.w1b is not None:
            return self.w1b.shape[0]
        if self.w2 is None and self.w2b is not None:
            return self.w2b.shape[0]
        return None

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return tuple(self.w1.shape)
        if self.w1a.ndim != 2 or self.w1b.ndim != 2 or self.w1a.shape[1] != self.w1b.shape[0]:
            raise FormatError(f"lokr_w1_a {list(self.w1a.shape)} and lokr_w1_b {list(self.w1b.shape)} do not multiply")
        return (self.w1a.shape[0], self.w1b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        if self.w2a.ndim != 2 or self.w2a.shape[1] != self.w2b.shape[0]:
            raise FormatError(f"lokr_w2_a {list(self.w2a.shape)} and lokr_w2_b {list(self.w2b.shape)} do not multiply")
        return (self.w2a.shape[0], *self.w2b.shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        (a, c), (b, d, *k) = self._w1_shape(), self._w2_shape()
        return (a * b, c * d, *k)

    def _diff(self, device: torch.device) -> torch.Tensor:
        w1 = fp32(self.w1, device) if self.w1 is not None else fp32(self.w1a, device) @ fp32(self.w1b, device)
        if self.w2 is not None:
            w2 = fp32(self.w2, device)
        elif self.t2 is not None:
            t2, w2a, w2b = (fp32(t, device) for t in (self.t2, self.w2a, self.w2b))
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", t2, w2a, w2b)
        else:
            w2b = fp32(self.w2b, device)
            w2 = (fp32(self.w2a, device) @ w2b.flatten(1)).view(-1, *w2b.shape[1:])
        w1 = w1.view(*w1.shape, *[1] * (w2.ndim - w1.ndim))
        return torch.kron(w1, w2.contiguous())
