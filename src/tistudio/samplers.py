"""A1111 sampler and schedule names, mapped to diffusers schedulers.

A1111 (since 1.9) names a sampler ("DPM++ 2M") and a schedule type ("Karras") apart; older versions and most
infotexts join them ("DPM++ 2M Karras"). tistudio's sampler names are the joined ones: the base name alone means
the uniform schedule (the model's own), "BASE Karras" or "BASE Exponential" the others. A1111's "Automatic"
schedule is each sampler's own default there (Karras for DPM++ 2M, exponential for DPM++ 2M SDE, ...), which
`resolve` reproduces. Matching ignores case and extra spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tistudio.errors import OptionError


@dataclass(frozen=True)
class Base:
    """One of A1111's samplers: the diffusers class and config that draw like it, and its schedules."""

    name: str
    scheduler_class: str
    config: tuple[tuple[str, Any], ...] = ()
    schedules: tuple[str, ...] = ("uniform",)  # what diffusers can do for it, of SCHEDULES
    automatic: str = "uniform"  # A1111 1.10's schedule for "Automatic"


# A1111's schedule types: API name -> label. Those diffusers can draw map to a config key.
SCHEDULES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}
_SIGMAS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}

_UKE = ("uniform", "karras", "exponential")
_DPMPP = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
_DPMPP_SDE = (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))
BASES = (
    Base("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP, _UKE, "karras"),
    Base("DPM++ SDE", "DPMSolverSDEScheduler", (), ("uniform", "karras"), "karras"),
    Base("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _DPMPP_SDE, _UKE, "exponential"),
    Base(
        "DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", (*_DPMPP_SDE, ("solver_type", "heun")), _UKE, "exponential"
    ),
    Base(
        "DPM++ 3M SDE",
        "DPMSolverMultistepScheduler",
        (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)),
        _UKE,
        "exponential",
    ),
    Base("Euler a", "EulerAncestralDiscreteScheduler"),
    Base("Euler", "EulerDiscreteScheduler", (), _UKE),
    Base("LMS", "LMSDiscreteScheduler", (), _UKE),
    Base("Heun", "HeunDiscreteScheduler", (), _UKE),
    Base("DPM2", "KDPM2DiscreteScheduler", (), _UKE),
    Base("DPM2 a", "KDPM2AncestralDiscreteScheduler", (), _UKE),
    Base("DDIM", "DDIMScheduler"),
    Base("PLMS", "PNDMScheduler", (("skip_prk_steps", True),)),
    Base("UniPC", "UniPCMultistepScheduler"),
    Base("LCM", "LCMScheduler"),
)
_BASE = {b.name: b for b in BASES}


def joined(base: str, schedule: str) -> str:
    """tistudio's name for a sampler on a schedule: "DPM++ 2M" + karras -> "DPM++ 2M Karras"."""
    return base if schedule == "uniform" else f"{base} {SCHEDULES[schedule]}"


# name -> (base, schedule), every sampler with every schedule diffusers can draw for it
_NAMED = {joined(b.name, s): (b.name, s) for b in BASES for s in b.schedules}
SAMPLERS: tuple[str, ...] = tuple(_NAMED)
_BY_KEY = {" ".join(name.lower().split()): name for name in SAMPLERS}


def check_sampler(name: str, field: str = "sampler") -> str:
    """The canonical name for `name`, or an error listing the choices."""
    canonical = _BY_KEY.get(" ".join(str(name).lower().split()))
    if canonical is None:
        raise OptionError(field, name, f"unknown sampler; choose one of: {', '.join(SAMPLERS)}")
    return canonical


def split(name: str) -> tuple[str, str]:
    """(A1111 sampler, schedule label) for a canonical name, as A1111 1.10 writes them: "DPM++ 2M Karras" ->
    ("DPM++ 2M", "Karras"); a uniform one under a sampler whose automatic schedule is uniform -> "Automatic"."""
    base, schedule = _NAMED[check_sampler(name)]
    if schedule == "uniform" and _BASE[base].automatic == "uniform":
        return base, SCHEDULES["automatic"]
    return base, SCHEDULES[schedule]


def _schedule(text: Any) -> str | None:
    """The A1111 API name of a schedule type given by its name or label, any case ("Karras", "sgm_uniform")."""
    words = " ".join(str(text).lower().replace("_", " ").split())
    return next((key for key, label in SCHEDULES.items() if words in (key.replace("_", " "), label.lower())), None)


def _with_schedule(words: str) -> tuple[str, str] | None:
    """(base, schedule) of a joined name ("dpm++ 2m karras"), or None."""
    bases = {b.name.lower(): b.name for b in BASES}
    for key, label in SCHEDULES.items():
        for suffix in (label.lower(), key.replace("_", " ")):
            if words.endswith(" " + suffix) and words[: -len(suffix) - 1] in bases:
                return bases[words[: -len(suffix) - 1]], key
    return None


def resolve(
    sampler: str, schedule: str | None, sampler_field: str = "sampler_name", schedule_field: str = "scheduler"
) -> str:
    """The canonical name for an A1111 request's sampler and schedule type, as A1111 1.10 picks them: a schedule
    in the sampler's name wins ("DPM++ 2M Karras"), else the schedule field, and "Automatic" (or none) is the
    sampler's own default. An unknown sampler or a schedule diffusers cannot draw for it is an error naming it."""
    words = " ".join(str(sampler).lower().split())
    base = next((b.name for b in BASES if b.name.lower() == words), None)
    chosen = _schedule(schedule or "automatic")
    if base is None and (found := _with_schedule(words)) is not None:
        base, chosen = found
    if base is None:
        raise OptionError(sampler_field, sampler, f"unknown sampler; choose one of: {', '.join(b.name for b in BASES)}")
    if chosen is None:
        raise OptionError(
            schedule_field, schedule, f"unknown schedule type; choose one of: {', '.join(SCHEDULES.values())}"
        )
    if chosen == "automatic":
        chosen = _BASE[base].automatic
    if chosen not in _BASE[base].schedules:
        can = ", ".join(SCHEDULES[s] for s in ("automatic", *_BASE[base].schedules))
        raise OptionError(
            schedule_field, SCHEDULES[chosen], f"tistudio cannot draw {base} on this schedule; choose one of: {can}"
        )
    return joined(base, chosen)


def schedules_offered() -> list[str]:
    """The schedule types some sampler here can use (A1111 API names), Automatic first."""
    return ["automatic", *[s for s in SCHEDULES if s != "automatic" and any(s in b.schedules for b in BASES)]]


def make_scheduler(name: str, base_config: dict[str, Any], seed: int | None = None) -> Any:
    """A fresh diffusers scheduler for a sampler name, on the model's noise schedule; `seed` seeds the Brownian
    noise of DPM++ SDE (which would otherwise draw its seed from torch's global generator)."""
    import diffusers

    base, schedule = _NAMED[check_sampler(name)]
    entry = _BASE[base]
    cls = getattr(diffusers, entry.scheduler_class)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if entry.scheduler_class != "DDIMScheduler":
        for key in ("clip_sample", "set_alpha_to_one", "skip_prk_steps"):
            config.pop(key, None)
    extra = dict(entry.config)
    if schedule in _SIGMAS:
        extra[_SIGMAS[schedule]] = True
    if entry.scheduler_class == "DPMSolverSDEScheduler" and seed is not None:
        extra["noise_sampler_seed"] = seed
    return cls.from_config({**config, **extra})
