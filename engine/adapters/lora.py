"""kohya LoRA and LyCORIS LoCon: ΔW = up @ down, with a Tucker middle (`lora_mid`) composed into down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapters.base import Adapter, FormatError, alpha_of, fp32, need


@dataclass(frozen=True)
class LoRA(Adapter):
    """up (out, rank[, 1, 1]) @ down (rank, in[, kh, kw]). A LoCon's 3x3 Tucker form stores
    down (rank, in, 1, 1), mid (rank, rank, kh, kw) and up; ΔW[o, i] = Σ up[o, a] mid[a, b] down[b, i],
    so mid is folded into down once at read time (fp32): the result is an ordinary conv LoRA, which
    the fuse's single-product fast path takes like any other."""

    down: torch.Tensor
    up: torch.Tensor

    kind = "LoRA"
    suffixes = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
    marks = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> LoRA:
        down, up = need(tensors, cls.kind, "lora_down.weight", "lora_up.weight")
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or any(k != 1 for k in up.shape[2:]):
            raise FormatError(f"lora_up {list(up.shape)} does not follow lora_down {list(down.shape)}")
        mid = tensors.get("lora_mid.weight")
        if mid is not None:
            if mid.ndim < 3 or tuple(mid.shape[:2]) != (rank, rank) or any(k != 1 for k in down.shape[2:]):
                raise FormatError(f"lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
            down = torch.einsum("a b ..., b i -> a i ...", mid.float(), down.float().flatten(1))
        return cls(alpha_of(tensors), tensors.get("dora_scale"), down.contiguous(), up.contiguous())

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def _diff(self, device: torch.device) -> torch.Tensor:
        return fp32(self.up, device).flatten(1) @ fp32(self.down, device).flatten(1)
