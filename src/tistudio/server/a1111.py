"""A1111's API requests as tistudio's options, and tistudio's results as A1111's answers.

Every field an A1111 client sends is either honoured or, where tistudio cannot do what it asks (hires fix, face
restoration, variation seeds, scripts), refused with a 422 that names it; fields that only matter to A1111's own
saving or UI (do_not_save_grid, override_settings_restore_afterwards, id_task, ...) and unknown keys are ignored,
as A1111's own API ignores unknown keys.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tistudio.errors import OptionError
from tistudio.generate.styles import Style, apply_styles
from tistudio.samplers import resolve, split
from tistudio.templates import SHIPPED


class CannotApply(OptionError):
    """A field tistudio reads but cannot do (answered with 422, naming it)."""


@dataclass
class Settings:
    """The A1111 options a client may set on this server (POST /sdapi/v1/options): kept per server, in memory."""

    clip_skip: int = 1


@dataclass(frozen=True)
class Txt2Img:
    """What a txt2img request asks: the generation options' fields, and how the answer is to be given."""

    options: dict[str, Any]
    styles: list[str] = field(default_factory=list)
    send_images: bool = True
    save_images: bool = False


# -- reading JSON values ----------------------------------------------------------------------------------------


def text(body: dict[str, Any], key: str, default: str = "") -> str:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OptionError(key, type(value).__name__, "send text")
    if "\x00" in value:
        raise OptionError(key, value, "contains a NUL character; send plain text")
    return value


def finite(key: str, value: Any) -> float:
    """A finite number from JSON's number, or a numeric string as some clients send."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(key, type(value).__name__, "send a number")
    try:
        number = float(value) if not isinstance(value, str) or len(value) <= 40 else math.nan
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise OptionError(key, value, "send a finite number")
    return number


def number(body: dict[str, Any], key: str, default: float) -> float:
    """A finite number; null, absent or 0 -> default (A1111's clients send 0 for "the default")."""
    value = body.get(key)
    return default if value is None or (value == 0 and not isinstance(value, bool)) else finite(key, value)


def whole(body: dict[str, Any], key: str, default: int, allow_zero: bool = False) -> int:
    """A whole number (1.0 is one; 1.5 is not); null or absent -> default, and 0 too unless allow_zero."""
    value = body.get(key)
    if value is None or (value == 0 and not allow_zero and not isinstance(value, bool)):
        return default
    got = finite(key, value)
    if got != int(got) or abs(got) > 2**53:
        raise OptionError(key, value, "send a whole number")
    return int(got)


def flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OptionError(key, type(value).__name__, "send true or false")
    return value


def names(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise OptionError(key, type(value).__name__, "send a list of names")
    return value


def refuse_unless(condition: bool, key: str, value: Any, why: str) -> None:
    if not condition:
        raise CannotApply(key, value, why)


# -- txt2img ----------------------------------------------------------------------------------------------------


def _refuse_what_tistudio_cannot_draw(body: dict[str, Any]) -> None:
    refuse_unless(
        not flag(body, "enable_hr", False),
        "enable_hr",
        True,
        "tistudio has no hires fix; generate at the size you want (send enable_hr false)",
    )
    refuse_unless(
        not flag(body, "restore_faces", False),
        "restore_faces",
        True,
        "tistudio has no face restoration; send restore_faces false",
    )
    refuse_unless(not flag(body, "tiling", False), "tiling", True, "tistudio cannot draw tiling images")
    strength = number(body, "subseed_strength", 0.0)
    refuse_unless(strength == 0, "subseed_strength", strength, "tistudio has no variation seeds; send 0")
    for key in ("seed_resize_from_w", "seed_resize_from_h"):
        value = whole(body, key, -1, allow_zero=True)
        refuse_unless(value in (-1, 0), key, value, "tistudio cannot resize a seed's noise; send -1")
    eta = body.get("eta")
    refuse_unless(
        eta is None or finite("eta", eta) == 1.0,
        "eta",
        eta,
        "tistudio's ancestral samplers draw at eta 1 (A1111's default); send 1 or leave it out",
    )
    for key, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", 0.0), ("s_noise", 1.0)):
        value = body.get(key)
        refuse_unless(
            value is None or finite(key, value) == default,
            key,
            value,
            f"tistudio draws with A1111's default {key} ({default:g}); leave it out",
        )
    script = body.get("script_name")
    refuse_unless(not script, "script_name", script, "tistudio runs no A1111 scripts; leave it out")
    scripts = body.get("alwayson_scripts") or {}
    refuse_unless(
        not scripts,
        "alwayson_scripts",
        ", ".join(map(str, scripts))[:80] if isinstance(scripts, dict) else scripts,
        "tistudio has no A1111 extensions (ControlNet, ADetailer, ...); send {}",
    )
    refiner = body.get("refiner_checkpoint")
    refuse_unless(not refiner, "refiner_checkpoint", refiner, "tistudio has no refiner pass; leave it out")


def _overrides(body: dict[str, Any], settings: Settings, model: dict[str, Any]) -> int:
    """The clip skip of a request's override_settings (the other keys a client may send are checked)."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise OptionError("override_settings", type(overrides).__name__, "send an object of settings")
    return apply_options(overrides, Settings(settings.clip_skip), model, "override_settings.").clip_skip


def apply_options(values: dict[str, Any], settings: Settings, model: dict[str, Any], prefix: str = "") -> Settings:
    """A1111 options applied to `settings` (in place, and returned): the ones tistudio has are honoured, the
    served checkpoint may be named, and any other is refused naming it."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key == "CLIP_stop_at_last_layers":
            skip = whole(values, key, 1)
            refuse_unless(1 <= skip <= 12, name, skip, "send 1 to 12")
            settings.clip_skip = skip
        elif key == "sd_model_checkpoint":
            wanted = str(value).split(" [")[0].strip().lower()
            served = {str(model["title"]).lower(), str(model["model_name"]).lower(), str(model["filename"]).lower()}
            refuse_unless(
                wanted in served or wanted == str(model["title"]).split(" [")[0].lower(),
                name,
                value,
                f"this server serves {model['title']} only; start another server for another model",
            )
        elif key == "randn_source":
            refuse_unless(str(value).upper() == "CPU", name, value, "tistudio draws its noise on the CPU only")
        elif key == "eta_noise_seed_delta":
            refuse_unless(whole(values, key, 0, allow_zero=True) == 0, name, value, "tistudio has no ENSD; send 0")
        elif key == "sd_vae":
            refuse_unless(str(value) in ("Automatic", "None"), name, value, "tistudio uses the model's own VAE")
        else:
            raise CannotApply(name, value, "tistudio has no such setting; leave it out")
    return settings


def txt2img_request(body: Any, settings: Settings, model: dict[str, Any], styles: dict[str, Style]) -> Txt2Img:
    """A1111's txt2img request as generation options (A1111's API defaults: 50 steps, Euler, 512 x 512, CFG 7)."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    _refuse_what_tistudio_cannot_draw(body)
    sampler = resolve(str(body.get("sampler_name") or body.get("sampler_index") or "Euler"), body.get("scheduler"))
    chosen = names(body, "styles")
    prompt, negative = apply_styles(text(body, "prompt"), text(body, "negative_prompt"), chosen, styles)
    options = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": whole(body, "steps", 50),
        "sampler": sampler,
        "cfg": number(body, "cfg_scale", 7.0),
        "seed": whole(body, "seed", -1, allow_zero=True),
        "size": f"{whole(body, 'width', 512)}x{whole(body, 'height', 512)}",
        "batch": whole(body, "batch_size", 1),
        "batch_count": whole(body, "n_iter", 1),
        "clip_skip": _overrides(body, settings, model),
    }
    if options["seed"] < -1:
        options["seed"] = -1  # A1111 treats every negative seed as "random"
    if options["seed"] == -1:
        options["seed"] = random.SystemRandom().randrange(2**32 - options["batch"] * options["batch_count"])
    return Txt2Img(options, chosen, flag(body, "send_images", True), flag(body, "save_images", False))


def txt2img_info(
    request: Txt2Img, result: dict[str, Any], model: dict[str, Any], started: float, interrupted: bool
) -> dict[str, Any]:
    """A1111's `info` (a JSON string in its answer) for what was made."""
    import time

    options = request.options
    images = result.get("images", []) if result else []
    seeds = [image["seed"] for image in images]
    count = len(images)
    base, schedule = split(options["sampler"])
    return {
        "prompt": options["prompt"],
        "all_prompts": [options["prompt"]] * count,
        "negative_prompt": options["negative_prompt"],
        "all_negative_prompts": [options["negative_prompt"]] * count,
        "seed": seeds[0] if seeds else options["seed"],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": result.get("width") or 0,
        "height": result.get("height") or 0,
        "sampler_name": base,
        "scheduler": schedule,
        "cfg_scale": options["cfg"],
        "steps": options["steps"],
        "batch_size": options["batch"],
        "n_iter": options["batch_count"],
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model["model_name"],
        "sd_model_hash": model["hash"],
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [image["infotext"] for image in images],
        "styles": request.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": options["clip_skip"],
        "is_using_inpainting_conditioning": False,
        "interrupted": interrupted,
        "version": "tistudio",
    }


# -- training (A1111's Train tab: create/embedding and train/embedding) ----------------------------------------


def create_request(body: Any) -> dict[str, Any]:
    """A1111's create/embedding (name, num_vectors_per_token, overwrite_old, init_text) as create options."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    return {
        "name": text(body, "name"),
        "vectors": whole(body, "num_vectors_per_token", 1),
        "overwrite": flag(body, "overwrite_old", False),
        "init_text": text(body, "init_text", "*"),
    }


def _square(body: dict[str, Any], width_key: str, height_key: str) -> int:
    width, height = whole(body, width_key, 512), whole(body, height_key, 512)
    refuse_unless(
        width == height,
        height_key,
        height,
        f"tistudio trains and previews square pictures; send {width_key} and {height_key} equal",
    )
    return width


def _clipping(body: dict[str, Any]) -> float:
    mode = text(body, "clip_grad_mode", "disabled")
    if mode == "disabled":
        return 0.0
    refuse_unless(mode == "norm", "clip_grad_mode", mode, "tistudio clips by norm only; send 'norm' or 'disabled'")
    value = body.get("clip_grad_value", "0.1")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return finite("clip_grad_value", value)
    if not isinstance(value, str) or ":" in value or "," in value:
        raise CannotApply("clip_grad_value", value, "tistudio clips at one number, not a schedule")
    return finite("clip_grad_value", value.strip())


def steps_of(body: dict[str, Any]) -> int:
    """The step to train to: A1111's Train tab sends 100000 by default; left out, that. 0 or less is refused: it
    would train nothing there, and nothing here should mean its opposite."""
    steps = whole(body, "steps", 100_000, allow_zero=True)
    if steps < 1:
        raise OptionError("steps", steps, "send the step to train to, at least 1 (A1111's Train tab sends 100000)")
    return steps


def _template(body: dict[str, Any]) -> str:
    value = text(body, "template_filename", "style_filewords.txt")
    name = value[:-4] if value.lower().endswith(".txt") else value
    refuse_unless(
        name in SHIPPED,
        "template_filename",
        value,
        f"choose one of: {', '.join(shipped + '.txt' for shipped in SHIPPED)}",
    )
    return name


def train_request(body: Any) -> tuple[dict[str, Any], str]:
    """A1111's train/embedding as training options (every one of its 30 parameters may be left out here, where
    A1111 requires them all), and the data_root sent. tistudio's own extras keep their defaults."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    refuse_unless(not flag(body, "varsize", False), "varsize", True, "tistudio trains at one size; send false")
    refuse_unless(
        not flag(body, "use_weight", False),
        "use_weight",
        True,
        "tistudio does not weight the loss by the PNG alpha channel; send false",
    )
    refuse_unless(
        not flag(body, "preview_from_txt2img", False),
        "preview_from_txt2img",
        True,
        "tistudio has no txt2img tab to read; send the preview_* fields",
    )
    sampling = text(body, "latent_sampling_method", "once")
    refuse_unless(
        sampling in ("once", "deterministic"),
        "latent_sampling_method",
        sampling,
        "tistudio encodes each picture once (its latent's mean); send 'once' or 'deterministic'",
    )
    size = _square(body, "training_width", "training_height")
    # preview_width/height: A1111 reads them only with preview_from_txt2img (refused above); previews are drawn at
    # the training size, as A1111's are without it
    learn = body.get("learn_rate", "0.005")
    seed = whole(body, "preview_seed", -1, allow_zero=True)
    options = {
        "embedding": text(body, "embedding_name"),
        "learning_rate": str(learn),
        "batch_size": whole(body, "batch_size", 1),
        "gradient_accumulation": whole(body, "gradient_step", 1),
        "size": size,
        "max_steps": steps_of(body),
        "clip_grad_norm": _clipping(body),
        "shuffle_tags": flag(body, "shuffle_tags", False),
        "tag_dropout": number(body, "tag_drop_out", 0.0),
        "preview_every": whole(body, "create_image_every", 500, allow_zero=True),
        "save_every": whole(body, "save_embedding_every", 500, allow_zero=True),
        "template": _template(body),
        "preview_prompt": text(body, "preview_prompt"),
        "preview_negative_prompt": text(body, "preview_negative_prompt"),
        "preview_steps": whole(body, "preview_steps", 20),
        "preview_sampler": resolve(str(body.get("preview_sampler_name") or "Euler a"), None, "preview_sampler_name"),
        "preview_cfg": number(body, "preview_cfg_scale", 7.0),
        "preview_seed": seed if seed >= 0 else random.SystemRandom().randrange(2**32),
        "preview_embedded": flag(body, "save_image_with_stored_embedding", True),
    }
    return options, text(body, "data_root")


def set_name(data_root: str, folders: tuple[Path, ...]) -> str:
    """The workspace set an A1111 data_root names: a set's name, or a path to a set folder of this workspace."""
    root = data_root.strip().rstrip("/\\")
    if root and "/" not in root and "\\" not in root:
        return root
    path = Path(root).expanduser()
    for folder in folders:
        try:
            if path.resolve().parent == folder.resolve():
                return path.name
        except OSError:
            break
    raise CannotApply(
        "data_root",
        data_root,
        "tistudio trains on its workspace's sets: upload the photos as a set "
        "(POST /api/photosets/NAME/photos) and send its name",
    )
