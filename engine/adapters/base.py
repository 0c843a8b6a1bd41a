"""What every adapter type shares: the factors it keeps, LyCORIS's alpha / rank rule, and DoRA.

An adapter is one module's entry of a LoRA-family file, kept as the small factors the file stores
(never a dense delta, unless the file itself is one); `delta` builds its ΔW in fp32 on the device
at fuse time, scaled by alpha / rank as LyCORIS does, and `merge` applies it to a weight.

DoRA (`dora_scale`) follows LyCORIS: W' = m * (W0 + ΔW) / ||W0 + ΔW||, the norm taken along the
axis the scale's shape names — (out, 1, ...) is one norm per output row, (1, in, ...) one per
input column (kohya's and LyCORIS's older default). ComfyUI reads the axis the same way but takes
the output-row norm of W0 alone, without ΔW; LyCORIS's own merge is the reference here. At a LoRA
scale s other than 1, the weight is W0 + s * (W' - W0) (torch.lerp, exact at 0 and 1), as ComfyUI
and A1111 blend it: LyCORIS's multiplier keeps ΔW at full strength inside the norm, so its scale 0
would not be the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch


class FormatError(ValueError):
    """A module whose tensors do not make the adapter its keys name (a factor missing or misshapen)."""


@dataclass(frozen=True)
class Adapter:
    """One module's update as the file stores it; subclasses say how its factors make ΔW."""

    alpha: float | None
    dora_scale: torch.Tensor | None

    kind: ClassVar[str]  # what users call it, for logs and errors
    suffixes: ClassVar[tuple[str, ...]]  # every key suffix it reads, after "<module>."
    marks: ClassVar[tuple[str, ...]]  # any of these suffixes makes a module this type

    @classmethod
    def claims(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether one module's tensors (keyed by suffix) are of this type."""
        return any(s in tensors for s in cls.marks)

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor]) -> Adapter:
        """The adapter of one module, from its tensors keyed by suffix (alpha, dora_scale, ...)."""
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None where LyCORIS applies no alpha (full factors)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape ΔW has, from the factors' shapes, without building it."""
        raise NotImplementedError

    def _diff(self, device: torch.device) -> torch.Tensor:
        """ΔW in fp32 on `device`, before alpha / rank."""
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        """alpha / rank; a missing or zero alpha means alpha = rank (LyCORIS and kohya)."""
        rank = self.rank
        if rank is None or not self.alpha:
            return 1.0
        return self.alpha / rank

    def delta(self, device: torch.device) -> torch.Tensor:
        """ΔW * alpha / rank, fp32, in the factors' own shape (the caller views it as the weight)."""
        diff = self._diff(device)
        scaling = self.scaling
        return diff if scaling == 1.0 else diff * scaling

    def merge(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The fp32 weight after this update at this LoRA scale (see the module docstring for DoRA)."""
        delta = self.delta(weight.device).reshape(weight.shape)
        if self.dora_scale is None:
            return weight.add(delta, alpha=scale)
        merged = weight + delta
        magnitude = self.dora_scale.to(weight.device, torch.float32)
        if magnitude.shape[0] == weight.shape[0] and magnitude[0].numel() == 1:  # (out, 1, ...): per output row
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(magnitude.shape)
        else:  # (1, in, ...): one norm per input column
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(magnitude.shape)
        decomposed = merged * (magnitude / (norm + torch.finfo(torch.float32).eps))
        return torch.lerp(weight, decomposed, scale)

    def check(self, weight_shape: tuple[int, ...]) -> None:
        """Refuse an update whose ΔW cannot be this weight (another model's file, or a damaged one)."""
        shape = self.shape
        fits = shape == weight_shape or (
            len(shape) == 2 and shape[0] == weight_shape[0] and shape[1] == math.prod(weight_shape[1:])
        )
        if not fits:
            raise FormatError(f"the {self.kind} update makes {list(shape)}, the model's weight is {list(weight_shape)}")
        if self.dora_scale is not None:
            out, inp = weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else 1
            rest = [1] * (len(weight_shape) - 1)
            allowed = {(out, *rest), (1, inp, *rest[1:]), (out,)}
            if tuple(self.dora_scale.shape) not in allowed:
                raise FormatError(
                    f"dora_scale has shape {list(self.dora_scale.shape)}, which names neither the output "
                    f"rows nor the input columns of a {list(weight_shape)} weight"
                )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it keeps, for the warm cache's byte count and for pinning."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]


def fp32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A factor on the device in fp32, without a copy when it already is."""
    return tensor.to(device, torch.float32, non_blocking=True)


def alpha_of(tensors: dict[str, torch.Tensor]) -> float | None:
    """The module's alpha as a float (files store it as a 0-d tensor of any dtype)."""
    alpha = tensors.get("alpha")
    return None if alpha is None else float(alpha.float().item())


def need(tensors: dict[str, torch.Tensor], kind: str, *names: str) -> list[torch.Tensor]:
    """The factors a type cannot do without, or a FormatError naming the first one missing."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(f"a {kind} module has no {missing[0]}")
    return [tensors[n] for n in names]
