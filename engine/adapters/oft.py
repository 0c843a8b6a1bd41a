"""Orthogonal fine-tuning: LyCORIS diag-OFT and BOFT, and sd-scripts' own OFT (networks/oft.py).

An OFT module rotates the weight's output rows: W' = R W0, R orthogonal and block-diagonal, made
from the file's blocks by the Cayley transform R = (I + Q)(I - Q)^-1 of their skew-symmetric part
Q = B - Bᵀ (files store the raw parameter B). So it is still a weight change once merged, but one
computed from the weight it is applied to, at fuse time, as DoRA is. A convolution's weight is
rotated the same way, flattened to (out, in·kh·kw).

- diag-OFT (`oft_blocks` (k, b, b), k·b = out): each group of b rows is mixed by its block as
  LyCORIS writes it, W'[k, m] = Σ_n R[k, n, m] W[k, n] (Rᵀ times the group's rows).
- BOFT (`oft_blocks` (stages, k, b, b)): stage i pairs rows 2^i·b/2 apart (the butterfly), mixes
  each group of b with R[i, group] (R times the rows), and puts the rows back; stages in order.
- `rescale` (out, 1, ...), if present, multiplies each output row of the rotated weight.
- `alpha` is LyCORIS's constraint per output row: ‖Q‖ over all the module's blocks is held to
  alpha·out (scaled down to it when ‖Q‖ + 1e-8 exceeds it; no bound when alpha is 0).
- sd-scripts' OFT (module names `oft_unet_…`, `oft_blocks` + `alpha`, no rescale) is diag-OFT with
  the same orientation, blocks and alpha·out bound, but its clamp always applies:
  Q · (min(‖Q‖, alpha·out) + 1e-8) / (‖Q‖ + 1e-8), so its alpha 0 means no rotation at all.

A LoRA scale s other than 1 blends linearly, W0 + s·(W' - W0) (torch.lerp, exact at 0 and 1), as
for DoRA. Without rescale this is LyCORIS's and sd-scripts' own multiplier for diag-OFT
(R_s = I + s(R - I)); LyCORIS scales BOFT's stages one by one and keeps `rescale` whole at any
multiplier (so its scale 0 is not the base), which this predictor does not follow.
LyCORIS writes no DoRA (`dora_scale`) for OFT or BOFT, so that combination is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.adapters.base import Adapter, FormatError, alpha_of, fp32, need


def cayley(blocks: torch.Tensor, bound: float, kohya: bool = False) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 for every block at once, Q = B - Bᵀ held to `bound` in norm (over all
    blocks together), by LyCORIS's rule or sd-scripts' (see the module docstring)."""
    q = blocks - blocks.transpose(-1, -2)
    if kohya:
        norm = torch.linalg.vector_norm(q)
        q = q * ((norm.clamp(max=bound) + 1e-8) / (norm + 1e-8))
    elif bound > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > bound:
            q = q * (bound / norm)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    # (I + Q) and (I - Q)^-1 commute (both are functions of Q): R = (I - Q)^-1 (I + Q), one solve.
    return torch.linalg.solve(eye - q, eye + q)


@dataclass(frozen=True)
class _Orthogonal(Adapter):
    """What diag-OFT and BOFT share: the blocks, the row rescale, the constraint, the blend."""

    blocks: torch.Tensor
    rescale: torch.Tensor | None

    suffixes = ("oft_blocks", "rescale", "alpha", "dora_scale")
    marks = ("oft_blocks",)
    ndim: ClassVar[int]  # the blocks' number of axes, which tells the two layouts apart (as LyCORIS does)

    @classmethod
    def claims(cls, tensors: dict[str, torch.Tensor]) -> bool:
        blocks = tensors.get("oft_blocks")
        return blocks is not None and blocks.ndim == cls.ndim

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> _Orthogonal:
        (blocks,) = need(tensors, cls.kind, "oft_blocks")
        if "dora_scale" in tensors:
            raise FormatError(
                f"a {cls.kind} module holds dora_scale: LyCORIS makes no DoRA for OFT / BOFT, so this "
                "combination is not applied"
            )
        if blocks.shape[-1] != blocks.shape[-2] or blocks.shape[-1] == 0:
            raise FormatError(f"oft_blocks {list(blocks.shape)} are not square blocks")
        adapter = cls(alpha_of(tensors), None, blocks, tensors.get("rescale"))
        adapter._check_layout()
        if adapter.rescale is not None and adapter.rescale.numel() != adapter.rows:
            raise FormatError(
                f"rescale {list(adapter.rescale.shape)} does not fit oft_blocks {list(blocks.shape)} "
                f"({adapter.rows} output rows)"
            )
        return adapter

    def _check_layout(self) -> None:
        """Refuse blocks whose arrangement cannot rotate any weight."""

    @property
    def rows(self) -> int:
        """The output rows the blocks rotate: blocks a stage times their size."""
        return self.blocks.shape[-3] * self.blocks.shape[-1]

    @property
    def rank(self) -> None:
        return None  # alpha is the constraint here, not a scale

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows,)

    def check(self, weight_shape: tuple[int, ...]) -> None:
        if weight_shape[0] != self.rows:
            raise FormatError(
                f"the {self.kind} blocks {list(self.blocks.shape)} rotate {self.rows} output rows, "
                f"the model's weight is {list(weight_shape)}"
            )

    def _rotated(self, weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """The weight's rows, (out, rest) in fp32, mixed by the rotations."""
        raise NotImplementedError

    def _bound(self) -> float:
        return (self.alpha or 0.0) * self.rows

    def _rotations(self, device: torch.device) -> torch.Tensor:
        return cayley(fp32(self.blocks, device), self._bound())

    def merge(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        rotated = self._rotated(weight.reshape(weight.shape[0], -1), self._rotations(weight.device))
        rotated = rotated.view(weight.shape)
        if self.rescale is not None:
            rescale = fp32(self.rescale, weight.device).reshape(-1, *[1] * (weight.ndim - 1))
            rotated = rotated * rescale
        return rotated if scale == 1 else torch.lerp(weight, rotated, scale)


@dataclass(frozen=True)
class OFT(_Orthogonal):
    """LyCORIS diag-OFT (`oft_blocks` (k, b, b)), and sd-scripts' OFT when `kohya` is set."""

    kohya: bool = False

    kind = "LyCORIS OFT"
    ndim = 3

    def _rotations(self, device: torch.device) -> torch.Tensor:
        return cayley(fp32(self.blocks, device), self._bound(), kohya=self.kohya)

    def _rotated(self, weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        k, b, _ = rotations.shape
        groups = weight.view(k, b, -1)
        return (rotations.transpose(1, 2) @ groups).view(weight.shape)


@dataclass(frozen=True)
class BOFT(_Orthogonal):
    """LyCORIS BOFT: `oft_blocks` (stages, k, b, b), b even, each stage a butterfly of b-row blocks."""

    kind = "LyCORIS BOFT"
    ndim = 4

    def _check_layout(self) -> None:
        stages, k, b, _ = self.blocks.shape
        # stage i pairs rows 2^i·b/2 apart: groups of 2^i·b rows must tile the k·b rows
        if b % 2 or stages == 0 or k % 2 ** (stages - 1):
            raise FormatError(
                f"oft_blocks {list(self.blocks.shape)} are no butterfly: {stages} stages of {k} blocks "
                f"of {b} rows need an even block size and {2 ** max(stages - 1, 0)} to divide {k}"
            )

    def _rotated(self, weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        stages, k, b, _ = rotations.shape
        rows, cols = weight.shape
        x = weight
        for i in range(stages):
            half = 2**i * (b // 2)
            # rows (c, 2, half) -> (c, half, 2): each block of b now holds rows `half` apart
            x = x.view(-1, 2, half, cols).transpose(1, 2).reshape(k, b, cols)
            x = rotations[i] @ x
            x = x.view(-1, half, 2, cols).transpose(1, 2).reshape(rows, cols)
        return x
