"""Scheduler names users know from A1111/ComfyUI, mapped to diffusers schedulers."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.errors import InputError

_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}
SCHEDULERS: tuple[str, ...] = tuple(_SCHEDULERS)

# How A1111 (1.9 and later) names each: its sampler and its "Schedule type". A1111's "Automatic"
# is the sampler's own default schedule: Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, the
# model's own (uniform) sigmas for the others.
_A1111: dict[str, tuple[str, str]] = {
    "Euler a": ("Euler a", "Automatic"),
    "Euler": ("Euler", "Automatic"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "Uniform"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "Karras"),
    "DDIM": ("DDIM", "Automatic"),
    "UniPC": ("UniPC", "Automatic"),
}
_A1111_DEFAULT_SCHEDULE = {"dpm++ 2m": "karras", "dpm++ 2m sde": "exponential"}
# Other spellings of the samplers above: A1111's aliases and ComfyUI's names (CivitAI's generator).
_SAMPLER_ALIASES = {
    "k_euler_a": "euler a",
    "k_euler_ancestral": "euler a",
    "euler_ancestral": "euler a",
    "k_euler": "euler",
    "k_dpmpp_2m": "dpm++ 2m",
    "dpmpp_2m": "dpm++ 2m",
    "k_dpmpp_2m_sde": "dpm++ 2m sde",
    "dpmpp_2m_sde": "dpm++ 2m sde",
    "uni_pc": "unipc",
}
# Schedules that give the diffusers scheduler's own spacing here.
_PLAIN_SCHEDULES = ("uniform", "normal")
_SCHEDULE_SUFFIXES = ("karras", "exponential", "uniform", "automatic", "normal", "sgm uniform", "simple")


def a1111_sampler(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 writes them for this project's scheduler `name`."""
    return _A1111[name]


def from_a1111(sampler: str, schedule: str | None) -> str | None:
    """This project's scheduler for A1111's sampler and schedule names (the old combined names such
    as "DPM++ 2M Karras" too, read as A1111 reads them), or None when none here matches."""
    name = sampler.strip().lower()
    name = _SAMPLER_ALIASES.get(name, name)
    wanted = (schedule or "automatic").strip().lower()
    for suffix in _SCHEDULE_SUFFIXES:
        if name.endswith(" " + suffix):  # A1111 lets a schedule in the sampler's name win
            name, wanted = name.removesuffix(" " + suffix), suffix
            break
    if wanted == "automatic":
        wanted = _A1111_DEFAULT_SCHEDULE.get(name, "uniform")
    if wanted in _PLAIN_SCHEDULES:
        wanted = ""
    for ours, (a1111, kind) in _A1111.items():
        if a1111.lower() == name and (kind.lower() if kind == "Karras" else "") == wanted:
            return ours
    return None


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler (they carry per-run state) from the model's own noise schedule."""
    if name not in _SCHEDULERS:
        raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    cls, overrides = _SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)
