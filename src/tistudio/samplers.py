"""A1111 sampler names, mapped to diffusers schedulers.

The names are A1111's (with the " Karras" suffix its older versions and most infotexts use). Matching ignores
case and extra spaces. Each entry is (diffusers scheduler class, extra config).
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError

_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", _KARRAS),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _DPMPP),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _DPMPP_SDE),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_DPMPP_SDE, **_KARRAS}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun Karras": ("HeunDiscreteScheduler", _KARRAS),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
_BY_KEY = {" ".join(name.lower().split()): name for name in SAMPLERS}


def check_sampler(name: str, field: str = "sampler") -> str:
    """The canonical A1111 name for `name`, or an error listing the choices."""
    canonical = _BY_KEY.get(" ".join(str(name).lower().split()))
    if canonical is None:
        raise OptionError(field, name, f"unknown sampler; choose one of: {', '.join(SAMPLERS)}")
    return canonical


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler for an A1111 sampler name, on the model's noise schedule."""
    import diffusers

    class_name, extra = SAMPLERS[check_sampler(name)]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if class_name != "DDIMScheduler":
        for key in ("clip_sample", "set_alpha_to_one", "skip_prk_steps"):
            config.pop(key, None)
    return cls.from_config({**config, **extra})
