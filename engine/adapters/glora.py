"""LyCORIS GLoRA: ΔW = (W0 @ a1 @ a2 + b1 @ b2) · alpha / rank, computed from the base weight.

Generalised LoRA adds to the plain low-rank term b1 @ b2 a low-rank map of the layer's own input
side, W0 a1 a2, so it needs W0 at fuse time, as DoRA and OFT do. LyCORIS's module (its
`a1`..`b2` are layers, stored as `<name>.weight`): a1 (in, rank), a2 (rank, in), b1 (out, rank),
b2 (rank, in[, kh, kw]); on a convolution a1, a2 and b1 are 1x1 kernels and a1 @ a2 multiplies
the input-channel axis of every kernel tap of W0. With a Tucker middle `bm` (rank, rank, kh, kw)
the b term is bm with b1 on its first axis and b2 on its second (b2 then 1x1). rank is a2's first
axis; alpha 0 or missing means alpha = rank. A scale s multiplies ΔW, as LyCORIS's multiplier and
ComfyUI's strength do.
An older LyCORIS GLoRA layout (a1 (rank, in), a2 (in, rank), b1 (rank, in), b2 (out, rank)) is not
read: its factors do not chain in this order, and the module is refused as damaged.
LyCORIS writes no DoRA (`dora_scale`) for GLoRA, so that combination is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.adapters.base import Adapter, FormatError, alpha_of, fp32, need


@dataclass(frozen=True)
class GLoRA(Adapter):
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    bm: torch.Tensor | None

    kind = "LyCORIS GLoRA"
    suffixes = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha", "dora_scale")
    marks = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> GLoRA:
        a1, a2, b1, b2 = need(tensors, cls.kind, "a1.weight", "a2.weight", "b1.weight", "b2.weight")
        if "dora_scale" in tensors:
            raise FormatError(
                "a LyCORIS GLoRA module holds dora_scale: LyCORIS makes no DoRA for GLoRA, so this "
                "combination is not applied"
            )
        bm = tensors.get("bm.weight")
        point = all(t.ndim >= 2 and all(k == 1 for k in t.shape[2:]) for t in (a1, a2, b1))
        rank, inp = a2.shape[0] if a2.ndim else 0, a1.shape[0] if a1.ndim else 0
        fits = (
            point
            and b2.ndim >= 2
            and (a1.shape[1], a2.shape[1], b1.shape[1], b2.shape[0], b2.shape[1]) == (rank, inp, rank, rank, inp)
        )
        if bm is not None:
            fits = fits and bm.ndim >= 3 and tuple(bm.shape[:2]) == (rank, rank) and all(k == 1 for k in b2.shape[2:])
        if not fits:
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2)))
            raise FormatError(f"GLoRA factors {shapes} do not make W·a1·a2 + b1·b2 (LyCORIS's GLoRA layout)")
        return cls(alpha_of(tensors), None, a1, a2, b1, b2, bm)

    @property
    def rank(self) -> int:
        return self.a2.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.bm is not None:
            return (self.b1.shape[0], self.b2.shape[1], *self.bm.shape[2:])
        return (self.b1.shape[0], *self.b2.shape[1:])

    def check(self, weight_shape: tuple[int, ...]) -> None:
        out, inp = weight_shape[0], math.prod(weight_shape[1:])
        old = (self.b2.shape[0], self.a2.shape[0], self.a1.shape[1], self.b1.shape[1]) == (out, inp, inp, inp)
        if old and self.shape != weight_shape:
            raise FormatError(
                "its GLoRA factors are in an older LyCORIS layout (a1 [rank, in], a2 [in, rank], b1 [rank, in], "
                "b2 [out, rank]) that this predictor does not read: re-save it with a current LyCORIS"
            )
        super().check(weight_shape)
        if len(weight_shape) < 2 or self.a1.shape[0] != weight_shape[1]:
            raise FormatError(
                f"GLoRA's a1 {list(self.a1.shape)} does not map the input channels of a {list(weight_shape)} weight"
            )

    def _diff(self, device: torch.device) -> torch.Tensor:
        """The b term alone (b1 @ b2, or its Tucker form); the a term needs the weight (`merge`)."""
        b1, b2 = fp32(self.b1, device).flatten(1), fp32(self.b2, device)
        if self.bm is not None:
            return torch.einsum("m n ..., i m, n j -> i j ...", fp32(self.bm, device), b1, b2.flatten(1))
        return b1 @ b2.flatten(1)

    def merge(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        device = weight.device
        a1, a2 = fp32(self.a1, device).flatten(1), fp32(self.a2, device).flatten(1)
        mapped = torch.einsum("o i ..., i r -> o r ...", weight, a1)
        mapped = torch.einsum("o r ..., r i -> o i ...", mapped, a2)
        delta = (self._diff(device).reshape(weight.shape) + mapped) * self.scaling
        return weight.add(delta, alpha=scale)
