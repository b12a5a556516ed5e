"""The job file: JSON Lines (one generation per line, omitted fields take the command line's values)
or plain text (one prompt per line). Every line is parsed and checked before any model loads, and a
mistake names its line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.controlnet import ControlNetSpec, control_specs
from optimized_sd.pipelines.job import Job
from optimized_sd.pipelines.masks import InpaintOptions, parse_outpaint


@dataclass(frozen=True)
class BatchJob:
    """One line of the job file as a complete single-prompt `Job`: its images are n_samples * n_iter,
    image i seeded seed + i (seed + i mod n_samples with fixed_code), exactly as a serial run seeds them."""

    line: int  # 1-based line number in the job file
    job: Job

    @property
    def prompt(self) -> str:
        return self.job.prompts[0]

    @property
    def images(self) -> int:
        return self.job.n_samples * self.job.n_iter

    def seed_of(self, base_seed: int, index: int) -> int:
        return base_seed + (index % self.job.n_samples if self.job.fixed_code else index)

    @property
    def key(self) -> str:
        """What makes this line's images, seed and output policy aside: a manifest record is reused
        on resume only when the line at that number still asks for the same thing."""
        text = repr(dataclasses.replace(self.job, seed=None, output=None))
        return hashlib.sha1(f"{self.line}:{text}".encode()).hexdigest()[:16]


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("a number")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _size(value: Any) -> dict[str, int]:
    """`"WxH"` or `[W, H]` -> width and height."""
    if isinstance(value, str) and value.lower().count("x") == 1:
        parts: list[Any] = value.lower().split("x")
        if all(part.strip().isdigit() for part in parts):
            return {"width": int(parts[0]), "height": int(parts[1])}
    if isinstance(value, list) and len(value) == 2:
        return {"width": _int(value[0]), "height": _int(value[1])}
    raise TypeError('"WIDTHxHEIGHT" or [width, height]')


def _resize(value: Any) -> tuple[int, int]:
    """`"WxH"` or `[W, H]` -> (width, height)."""
    size = _size(value)
    return size["width"], size["height"]


def _optional_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _prompt(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("a non-empty string")
    return {"prompts": (value,)}


def _path(value: Any) -> Path:
    return Path(_str(value))


def _loras(value: Any) -> dict[str, tuple[str, ...]]:
    """`["FILE", "FILE:WEIGHT"]` (as --lora) or `{"FILE": WEIGHT}` -> the Job's 'FILE:WEIGHT' list."""
    if isinstance(value, dict):
        return {"loras": tuple(f"{_str(path)}:{_float(weight):g}" for path, weight in value.items())}
    if isinstance(value, list):
        return {"loras": tuple(_str(item) for item in value)}
    raise TypeError('a list of "FILE[:WEIGHT]" or an object {"FILE": WEIGHT}')


# a ControlNet unit's keys -> (ControlNetSpec field, converter); "model" and "file" both name the ControlNet
CONTROLNET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "model": ("file", _str), "file": ("file", _str), "image": ("image", _path), "weight": ("weight", _float),
    "start": ("start", _float), "end": ("end", _float), "mode": ("mode", _str), "resize": ("resize", _str),
    "preprocessor": ("preprocessor", _str), "threshold_a": ("threshold_a", _float), "threshold_b": ("threshold_b", _float),
}  # fmt: skip


def _controlnet(value: Any) -> tuple[ControlNetSpec, ...]:
    """One unit's object -> its ControlNetSpec (the file as --controlnet's 'FILE[:WEIGHT]')."""
    if not isinstance(value, dict) or not ("model" in value or "file" in value) or "image" not in value:
        raise TypeError('a list of objects {"model": FILE, "image": FILE, ...}')
    unknown = [key for key in value if key not in CONTROLNET_KEYS]
    if unknown:
        raise TypeError(f"a list of objects with the keys {', '.join(CONTROLNET_KEYS)} (not {unknown[0]!r})")
    settings: dict[str, Any] = {}
    for key, item in value.items():
        name, convert = CONTROLNET_KEYS[key]
        try:
            settings[name] = convert(item)
        except TypeError as expected:
            raise TypeError(f"a list of unit objects whose {key!r} is {expected}") from None
    file, image = settings.pop("file"), settings.pop("image")
    return control_specs([file], [image], **{name: [item] for name, item in settings.items()})


def _controlnets(value: Any) -> tuple[ControlNetSpec, ...]:
    """`[{"model": FILE, "image": FILE, "weight": W, "start": S, ...}, ...]` -> the Job's ControlNet units."""
    if not isinstance(value, list):
        raise TypeError('a list of objects {"model": FILE, "image": FILE, ...}')
    return tuple(spec for unit in value for spec in _controlnet(unit))


def _outpaint(value: Any) -> tuple[int, int, int, int]:
    if isinstance(value, str):
        return parse_outpaint(value)
    if isinstance(value, list) and len(value) == 4:
        return tuple(_int_or_zero(item) for item in value)  # type: ignore[return-value]
    raise TypeError('"LEFT,RIGHT,TOP,BOTTOM" or [left, right, top, bottom] pixels')


def _int_or_zero(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError("whole numbers of pixels >= 0")
    return value


# field -> converter to Job keyword values (a dict when the field sets several Job fields or another name)
FIELDS: dict[str, Callable[[Any], Any]] = {
    "prompt": _prompt,
    "negative_prompt": _str,
    "seed": _optional_int,
    "n_samples": _int,
    "n_iter": _int,
    "fixed_code": _bool,
    "steps": _int,
    "sampler": _str,
    "karras": _bool,
    "eta": _float,
    "scale": _float,
    "width": _int,
    "height": _int,
    "size": _size,
    "strength": _float,
    "init_image": _path,
    "schedule": _str,
    "loras": _loras,
    "refiner": _path,
    "refiner_switch": _float,
    "controlnets": _controlnets,
    # hires fix: on with "hires": true, or with hr_scale / hr_resize (as the CLI's --hr-scale / --hr-resize)
    "hires": _bool, "hr_scale": _float, "hr_resize": _resize, "hr_upscaler": _str, "hr_steps": _int, "hr_strength": _float,
    "hr_sampler": _optional_str, "hr_prompt": _optional_str, "hr_negative_prompt": _optional_str,
    "guidance": _float, "max_sequence_length": _int,  # Flux.1: dev's distilled guidance, T5 tokens per prompt
    "cfg_normalization": _float, "cfg_truncation": _float,  # Z-Image's CFG options
}
# fields of the job's InpaintOptions (a line with any of them is inpainting; `mask` needs `init_image`)
INPAINT_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "mask": ("mask", _path),
    "invert_mask": ("invert_mask", _bool),
    "mask_blur": ("mask_blur", _float),
    "inpaint_area": ("area", _str),
    "padding": ("padding", _int),
    "outpaint": ("outpaint", _outpaint),
    "masked_content": ("masked_content", _str),
}


# Request field (a `Job`, `InpaintOptions` or `OutputPolicy` field) -> the job file's key for it; None: a line
# cannot set it (the command line's flag does, for every line). A FieldError is said with these keys.
BATCH_KEYS: dict[str, str | None] = {
    **{name: name for name in FIELDS if name not in ("prompt", "size")},
    "prompts": "prompt", "prompt_file": None, "latent_channels": None, "downscale": None, "unet_batch": None,
    "inpaint": None, "max_image_pixels": None,
    "output": None, "outdir": None, "fmt": None, "skip_save": None, "skip_grid": None, "n_rows": None, "report_json": None,
    "preview_every": None,  # live previews: the CLI writes files; the server shows them (VAE-approx/)
    **{target: name for name, (target, _) in INPAINT_FIELDS.items()},
}  # fmt: skip


def record_field(field: str) -> str | None:
    """The job file's key for a request field (None: no line sets it)."""
    return BATCH_KEYS.get(field)


def job_from_record(record: dict[str, Any], defaults: Job) -> Job:
    """`defaults` with the record's fields applied (UserError naming a bad or unknown field)."""
    changes: dict[str, Any] = {}
    inpaint: dict[str, Any] = {}
    for name, value in record.items():
        target, convert = INPAINT_FIELDS.get(name, (name, FIELDS.get(name)))
        if convert is None:
            raise UserError(f"unknown field {name!r} (known: {', '.join([*FIELDS, *INPAINT_FIELDS])})")
        try:
            converted = convert(value)
        except TypeError as expected:
            raise UserError(f"field {name!r} must be {expected}, not {json.dumps(value)}") from None
        if name in INPAINT_FIELDS:
            inpaint[target] = converted
        else:
            changes.update(converted if isinstance(converted, dict) else {name: converted})
    if ("hr_scale" in record or "hr_resize" in record) and "hires" not in record:
        changes["hires"] = True
    if inpaint:
        changes["inpaint"] = dataclasses.replace(defaults.inpaint or InpaintOptions(), **inpaint)
    return dataclasses.replace(defaults, prompt_file=None, **changes)


def is_json_lines(path: Path, lines: list[str]) -> bool:
    """`.jsonl` files, or any file whose first non-blank line is a JSON object; else a prompts file."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def read_lines(path: Path) -> list[str]:
    """The job file's lines; a missing or unreadable file is the user's mistake."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read job file {path}: {error}") from None


def line_record(text: str) -> dict[str, Any]:
    """One JSON-lines line as its object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise UserError("a line must be a JSON object")
    return record


def line_field_error(error: FieldError, record: dict[str, Any], where: str) -> UserError:
    """The error to raise for a field mistake on a line: it names the line's key, or, where the value came
    from the command line, stays a FieldError so that the CLI names its flag."""
    name = record_field(error.field)
    if name in ("width", "height") and "size" in record:
        name = "size"
    if name is None or name not in record:
        return FieldError(error.field, where + str(error), error.problem, where + error.context)
    return UserError(f"{where}field {error.named(repr(name))}")


def read_jobs(path: Path, defaults: Job) -> list[BatchJob]:
    """Every generation of the job file, checked (`Job.validate`) before anything runs. `defaults`
    holds the command line's values, its prompt included; blank lines are skipped but still counted.
    A mistake in a line's field names the line and its key; one in a value from the command line is
    raised as it is (the CLI names its flag)."""
    lines = read_lines(path)
    json_lines = is_json_lines(Path(path), lines)
    jobs: list[BatchJob] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        record: dict[str, Any] = {}
        try:
            if json_lines:
                record = line_record(text)
                job = job_from_record(record, defaults)
            else:
                job = dataclasses.replace(defaults, prompts=(text.strip(),), prompt_file=None)
            job.validate()
        except FieldError as error:
            raise line_field_error(error, record, f"{path} line {number}: ") from None
        except UserError as error:
            raise UserError(f"{path} line {number}: {error}") from None
        jobs.append(BatchJob(number, job))
    if not jobs:
        raise UserError(f"job file {path} holds no job")
    return jobs
