"""Generation parameters as the A1111 `parameters` text that image viewers and CivitAI read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationParameters:
    """What made one image, enough to reproduce it. Holds no tokens."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    clip_skip: int = 0
    denoising_strength: float | None = None
    cfg_cutoff: float | None = None
    deep_cache: str | None = None  # go_fast's feature reuse, e.g. "from 0.3, every 3rd step full"
    loras: tuple[tuple[str, float], ...] = ()  # display names: tokens are stripped before this point
    control: str | None = None  # A1111's "ControlNet 0" value, when a ControlNet guided the image
    ip_adapter: tuple[str, float, int] | None = None  # (adapter, scale, reference images) when one was used
    # The built-in upscaler, in A1111's postprocessing keys; width and height stay the generated size,
    # so the parameters reproduce the generation and say what was done to it after.
    upscale_by: int | None = None
    upscaler: str | None = None

    def to_a1111(self) -> str:
        """`prompt\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...` in A1111's order."""
        fields = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", f"{self.cfg_scale:g}"),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model),
        ]
        if self.clip_skip:
            fields.append(("Clip skip", self.clip_skip))
        if self.cfg_cutoff is not None:
            fields.append(("CFG cutoff", f"{self.cfg_cutoff:g}"))
        if self.deep_cache is not None:
            fields.append(("Deep cache", self.deep_cache))
        if self.denoising_strength is not None:
            fields.append(("Denoising strength", f"{self.denoising_strength:g}"))
        if self.loras:
            fields.append(("Lora", ", ".join(f'"{name}: {scale:g}"' for name, scale in self.loras)))
        if self.control is not None:
            fields.append(("ControlNet 0", f'"{self.control}"'))
        if self.ip_adapter is not None:
            name, scale, count = self.ip_adapter
            fields.append(("IP-Adapter", f'"{name}: {scale:g}, {count} image{"s" if count > 1 else ""}"'))
        if self.upscale_by is not None:
            fields.append(("Postprocess upscale by", self.upscale_by))
            fields.append(("Postprocess upscaler", self.upscaler))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {v}" for k, v in fields))
        return "\n".join(lines)
