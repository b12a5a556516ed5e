"""sd-webui-controlnet's API on this server: units in `alwayson_scripts: {"controlnet": {"args": [...]}}`
(the script's name in any case: `webuiapi` sends "ControlNet") become ControlNetSpecs, with their models
named from the catalog's `ControlNet/` folder (a name, never a path); and its `/controlnet/model_list`,
`/controlnet/module_list` and `/controlnet/version` routes. A bad unit field is a FieldError naming
`alwayson_scripts.controlnet.args[i].FIELD` by sd-webui-controlnet's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.control_hints import CANNY_HIGH, CANNY_LOW
from optimized_sd.pipelines.controlnet import MODE_NAMES, RESIZE_NAMES, ControlNetSpec
from optimized_sd.server.catalog import ModelCatalog, ModelEntry

SCRIPT = "controlnet"
ARGS = f"alwayson_scripts.{SCRIPT}.args"
API_VERSION = 2  # sd-webui-controlnet's /controlnet/version: clients check it is at least 2
# sd-webui-controlnet's module names (as /controlnet/module_list gives them) -> our preprocessors; ours also accepted
MODULES = {"none": "none", "invert (from white bg & black line)": "invert", "canny": "canny"}
CONTROL_MODES = {**{name.lower(): ours for ours, name in MODE_NAMES.items()}, **dict(enumerate(MODE_NAMES))}
RESIZE_MODES = {**{name.lower(): ours for ours, name in RESIZE_NAMES.items()}, 0: "resize", 1: "crop", 2: "fill"}
# ControlNetSpec field -> the unit's field, to name a mistake `ControlNetSpec.check` finds
UNIT_FIELDS = {"weight": "weight", "start": "guidance_start", "end": "guidance_end", "mode": "control_mode",
               "resize": "resize_mode", "preprocessor": "module", "threshold_a": "threshold_a", "threshold_b": "threshold_b"}  # fmt: skip

ImageDecoder = Callable[[str, str], Image.Image]  # (base64 data, field name) -> image, the API's `decode_image`


def unit_error(index: int, field: str | None, problem: str) -> FieldError:
    name = f"{ARGS}[{index}]" + (f".{field}" if field else "")
    return FieldError(name, f"{name} {problem}", problem)


def controlnet_args(scripts: dict[str, Any] | None) -> list:
    """The ControlNet script's unit list; any other always-on script is refused by name (this server has none)."""
    args: list = []
    for name, script in (scripts or {}).items():
        if name.strip().lower() != SCRIPT:
            raise FieldError(f"alwayson_scripts.{name}", f"alwayson_scripts: the script {name!r} is not supported by this server")
        given = script.get("args") if isinstance(script, dict) else None
        if not isinstance(given, list):
            raise FieldError(ARGS, f"{ARGS} must be a list of ControlNet units (objects)")
        args = given
    return args


def number(unit: dict[str, Any], index: int, field: str, default: float) -> float:
    value = unit.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise unit_error(index, field, f"must be a number, got {value!r}")
    return float(value)


def named(unit: dict[str, Any], index: int, field: str, table: dict, default: str) -> str:
    """A choice given by sd-webui-controlnet's name (any case), its number, or our own name."""
    value = unit.get(field)
    if value is None:
        return default
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, str) and key in table.values():
        return key
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key not in table:
        offered = ", ".join(repr(name) for name in table if isinstance(name, str))
        raise unit_error(index, field, f"{value!r} is unknown; use one of {offered}")
    return table[key]


def control_model(unit: dict[str, Any], index: int, catalog: ModelCatalog) -> ModelEntry:
    """The unit's ControlNet by name from the catalog; a path (a slash or `..`) is never looked up."""
    name = unit.get("model")
    if not isinstance(name, str) or not name.strip() or name.strip().lower() == "none":
        raise unit_error(index, "model", "is missing: name a ControlNet from /controlnet/model_list")
    if "/" in name or "\\" in name or ".." in name:
        raise unit_error(index, "model", f"{name!r} is a path; name a ControlNet from /controlnet/model_list")
    entry = catalog.find_controlnet(name)
    if entry is None:
        raise unit_error(index, "model", f"{name!r} not found; see /controlnet/model_list")
    return entry


def control_picture(unit: dict[str, Any], index: int, decode: ImageDecoder, init_image: Image.Image | None) -> Image.Image:
    """The unit's image (base64, or sd-webui-controlnet's {"image", "mask"}); none given: img2img's init image."""
    image = unit.get("image")
    mask = unit.get("mask") or (image.get("mask") if isinstance(image, dict) else None)
    if mask:
        raise unit_error(index, "mask", "is not supported by this server (a unit's control image only)")
    image = image.get("image") if isinstance(image, dict) else image
    if not image and init_image is not None:  # webuiapi sends "" for no image
        return init_image
    if not image:
        raise unit_error(index, "image", "is missing: txt2img needs a control image per unit")
    return decode(image, f"{ARGS}[{index}].image")


def unit_spec(
    unit: dict[str, Any], index: int, catalog: ModelCatalog, decode: ImageDecoder, init_image: Image.Image | None
) -> ControlNetSpec:
    """One enabled unit -> its ControlNetSpec, checked (`ControlNetSpec.check`, said with the unit's field names)."""
    entry = control_model(unit, index, catalog)
    preprocessor = named(unit, index, "module", MODULES, "none")
    canny = preprocessor == "canny"  # the thresholds are canny's; other modules' values (sd-webui's 64s) mean nothing here
    low, high = number(unit, index, "threshold_a", CANNY_LOW), number(unit, index, "threshold_b", CANNY_HIGH)
    spec = ControlNetSpec(
        entry.path,
        control_picture(unit, index, decode, init_image),
        weight=number(unit, index, "weight", 1.0),
        start=number(unit, index, "guidance_start", 0.0),
        end=number(unit, index, "guidance_end", 1.0),
        mode=named(unit, index, "control_mode", CONTROL_MODES, "balanced"),
        resize=named(unit, index, "resize_mode", RESIZE_MODES, "crop"),
        preprocessor=preprocessor,
        threshold_a=low if canny and low >= 0 else CANNY_LOW,  # -1: the module's default, as sd-webui-controlnet
        threshold_b=high if canny and high >= 0 else CANNY_HIGH,
    )
    try:
        spec.check(index)
    except FieldError as error:
        problem = error.problem.removeprefix(f"{index}: ")
        raise unit_error(index, UNIT_FIELDS.get(problem.split(" ", 1)[0]), problem) from None
    return spec


def controlnet_specs(
    scripts: dict[str, Any] | None, catalog: ModelCatalog, decode: ImageDecoder, init_image: Image.Image | None = None
) -> tuple[ControlNetSpec, ...]:
    """The enabled units of a request's `alwayson_scripts` (disabled ones skipped), in order."""
    specs = []
    for index, unit in enumerate(controlnet_args(scripts)):
        if not isinstance(unit, dict):
            raise unit_error(index, None, "must be an object (a ControlNet unit)")
        if unit.get("enabled", True):
            specs.append(unit_spec(unit, index, catalog, decode, init_image))
    return tuple(specs)


def model_title(entry: ModelEntry) -> str:
    """sd-webui-controlnet's "name [hash]" (AUTOMATIC1111's legacy short hash, cheap to read); the name alone if unreadable."""
    from optimized_sd.weights.diffusers_folder import find_weight_file
    from optimized_sd.weights.hashing import legacy_model_hash

    try:
        return f"{entry.model_name} [{legacy_model_hash(find_weight_file(entry.path) if entry.path.is_dir() else entry.path)}]"
    except UserError:
        return entry.model_name


def add_controlnet_routes(route: Callable, catalog: ModelCatalog) -> None:
    """sd-webui-controlnet's listing routes (`route(path, methods)` registers under /controlnet)."""

    @route("/model_list", ["GET"])
    def model_list() -> dict[str, Any]:
        return {"model_list": [model_title(entry) for entry in catalog.controlnets()]}

    @route("/module_list", ["GET"])
    def module_list() -> dict[str, Any]:
        return {"module_list": list(MODULES)}

    @route("/version", ["GET"])
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}
