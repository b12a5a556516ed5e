"""The gradio web UI: one tab per task, built by one function, over the shared job queue.

Each Generate press queues a job and then polls it, streaming the progress bar (with the place in the
queue while it waits) and a latent preview every few steps; Cancel stops the session's own job at the
next step (or takes it out of the queue). Errors are shown as one message, never a stack trace.

The inpaint tab is img2img on an image editor: the user uploads the image and paints over what is
to be repainted; the painted layer's alpha is the mask (`drawn_mask`)."""

import html
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr
from PIL import Image, ImageChops

from optimized_sd.errors import FieldError, UserError
from optimized_sd.families.flux import GUIDANCE_DEFAULT
from optimized_sd.pipelines.controlnet import MODE_NAMES, ControlNetSpec
from optimized_sd.pipelines.defaults import (
    DEFAULT_HR_SCALE,
    DEFAULT_HR_STRENGTH,
    DEFAULT_HR_UPSCALER,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STRENGTH,
)
from optimized_sd.pipelines.hires import UPSCALERS, HiresFix
from optimized_sd.sampling import SAMPLERS, sampler_display_name
from optimized_sd.server.backend import INPAINTING_FILL, MEMORY_CHOICES, Generated, GenerationSpec
from optimized_sd.server.catalog import ModelCatalog
from optimized_sd.server.controlnet_api import MODULES
from optimized_sd.server.jobs import Job, JobCancelled
from optimized_sd.server.service import Service

log = logging.getLogger("optimized_sd")

POLL_SECONDS = 0.15
SERVER_DEFAULT = "server default"
NO_REFINER = "None"  # the refiner dropdown's "no refiner", as AUTOMATIC1111 shows it
NO_CONTROLNET = "None"  # the ControlNet model dropdown's "no unit"
TASKS = ("txt2img", "img2img", "inpaint")
IMAGE_TASKS = ("img2img", "inpaint")  # the tabs that start from an uploaded image
MASK_ALPHA_THRESHOLD = 128  # a painted pixel at least half opaque is repainted (AUTOMATIC1111 also cuts an RGBA mask at 128)
INPAINT_AREAS = [("whole picture", "whole"), ("only masked", "masked")]
# AUTOMATIC1111's UI defaults, kept for the families that take them (`Defaults.a1111`: SD); the others' controls
# start at their record's (`Backend.family_defaults`) and are reset to them when such a model is loaded.
A1111_UI_DEFAULTS: dict[str, float] = {"steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512}
MASKED_CONTENT_CHOICES = [(name.replace("-", " "), value) for value, name in INPAINTING_FILL.items()]  # labels -> inpainting_fill
# Request field (a `Job`, `InpaintOptions` or `OutputPolicy` field) -> the label of the control that sets it;
# None: no control does. A FieldError is shown with these words (`said`).
UI_CONTROLS: dict[str, str | None] = {
    "prompts": "Prompt", "prompt_file": None, "negative_prompt": "Negative prompt", "seed": "Seed", "n_samples": "Batch size",
    "n_iter": "Batch count", "fixed_code": None, "steps": "Steps", "scale": "CFG scale", "eta": None, "sampler": "Sampler",
    "karras": "Karras sigmas", "schedule": None, "loras": None, "refiner": "Refiner", "refiner_switch": "Refiner switch at",
    "height": "Height", "width": "Width", "latent_channels": None, "downscale": None, "unet_batch": None, "init_image": "Init image",
    "strength": "Denoising strength", "inpaint": None, "max_image_pixels": None,
    "controlnets": "ControlNet",
    "output": None, "outdir": None, "fmt": None, "skip_save": None, "skip_grid": None, "n_rows": None, "report_json": None,
    "preview_every": None,  # live previews: the CLI writes files; the server shows them (VAE-approx/)
    "mask": "Mask", "invert_mask": "Invert the mask", "mask_blur": "Mask blur", "area": "Inpaint area", "padding": "Padding",
    "outpaint": None, "masked_content": "Masked content",
    "hires": "Hires fix", "hr_scale": "Upscale by", "hr_upscaler": "Upscaler", "hr_steps": "Hires steps",
    "hr_strength": "Hires denoising strength", "hr_resize": None, "hr_sampler": None, "hr_prompt": None, "hr_negative_prompt": None,
    "guidance": "Distilled CFG scale",  # Forge's control, shown for Flux.1 dev
    "max_sequence_length": None,  # Forge has no control for it: the CLI, batch lines and the library
    "cfg_normalization": None, "cfg_truncation": None,  # Z-Image's: the CLI, batch lines and the API
}  # fmt: skip


def said(mistake: UserError) -> str:
    """A mistake as the UI shows it: a FieldError names the control of its field."""
    label = UI_CONTROLS.get(mistake.field) if isinstance(mistake, FieldError) else None
    return f"{label}: {mistake.problem}" if label else str(mistake)


def progress_html(fraction: float, text: str, state: str, job: Job | None = None) -> str:
    """A progress bar the browser tests can read: `data-state`, `data-percent` and `data-job` (the
    job it follows) on the outer div."""
    percent = max(0, min(100, round(fraction * 100)))
    job_id = job.id if job is not None else ""
    return (
        f'<div class="osd-progress" data-state="{state}" data-percent="{percent}" data-job="{job_id}" '
        'style="position:relative;height:24px;border:1px solid #9ca3af;border-radius:4px;overflow:hidden">'
        f'<div class="osd-bar" style="height:100%;width:{percent}%;background:#f97316"></div>'
        f'<span class="osd-text" style="position:absolute;left:8px;top:2px;font-size:13px">{html.escape(text)}</span></div>'
    )


def error_html(message: str) -> str:
    if not message:
        return ""
    return f'<div class="osd-error" role="alert" style="color:#b91c1c;font-weight:600">{html.escape(message)}</div>'


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def wait_text(position: int) -> str:
    ahead = position - 1
    return f"waiting: {ordinal(position)} in the queue" + (
        f" ({ahead} job{'s' if ahead != 1 else ''} ahead)" if ahead else " (the device is busy)"
    )


def gallery_images(made: Generated) -> list[tuple[Image.Image, str]]:
    """The PNGs as PIL images that keep their `parameters` text (gradio writes it back into the PNG
    it serves, so the gallery's download carries the metadata), captioned with their seed."""
    return [(Image.open(io.BytesIO(data)), f"seed {seed}") for data, seed in zip(made.pngs, made.seeds, strict=True)]


def drawn_mask(layers: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The editor's painted layers -> an L mask (255: repaint): each layer's alpha, merged by
    maximum and thresholded at MASK_ALPHA_THRESHOLD. No layer: an all-black mask of `size`.
    Layers come at the canvas size; one of another size than the first is resized to it."""
    if not layers:
        return Image.new("L", size, 0)
    merged = Image.new("L", layers[0].size, 0)
    for layer in layers:
        alpha = layer.getchannel("A") if layer.mode in ("RGBA", "LA") else layer.convert("L")
        merged = ImageChops.lighter(merged, alpha if alpha.size == merged.size else alpha.resize(merged.size, Image.LANCZOS))
    return merged.point(lambda value: 255 if value >= MASK_ALPHA_THRESHOLD else 0)


def editor_image_and_mask(value: dict | None, invert: bool) -> tuple[Image.Image, Image.Image]:
    """The inpaint editor's value (gradio's {"background", "layers", "composite"}) -> the image and
    the drawn mask; a UserError for what the user still has to do."""
    background = value.get("background") if value else None
    if background is None:
        raise UserError("inpaint needs an image: upload one, then paint over the part to repaint")
    mask = drawn_mask([layer for layer in value.get("layers") or [] if layer is not None], background.size)
    if mask.getextrema()[1] == 0 and not invert:
        raise UserError("nothing to repaint: paint over the part of the image to repaint first")
    return background.convert("RGB"), mask


@dataclass
class InpaintControls:
    """The inpaint tab's own inputs (AUTOMATIC1111's names in GenerationSpec)."""

    mask_blur: gr.Slider
    inpaint_area: gr.Radio
    padding: gr.Slider
    invert_mask: gr.Checkbox
    masked_content: gr.Radio


@dataclass
class HiresControls:
    """The txt2img tab's hires fix (AUTOMATIC1111's names in its API)."""

    enable_hr: gr.Checkbox
    hr_upscaler: gr.Dropdown
    hr_scale: gr.Slider
    hr_steps: gr.Slider
    hr_strength: gr.Slider


@dataclass
class ControlNetControls:
    """Each tab's one ControlNet unit (sd-webui-controlnet's fields, by our names)."""

    control_image: gr.Image
    control_model: gr.Dropdown
    control_weight: gr.Slider
    control_start: gr.Slider
    control_end: gr.Slider
    control_mode: gr.Radio
    control_preprocessor: gr.Dropdown


@dataclass
class TaskForm:
    """The inputs of one tab by name; `inputs()` lists those the tab has, in field order, and the
    generate handler gets their values back by the same names (`names()`)."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    karras: gr.Checkbox
    steps: gr.Slider
    cfg_scale: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    batch_size: gr.Slider
    n_iter: gr.Slider
    memory: gr.Dropdown
    vram_budget: gr.Textbox
    refiner: gr.Dropdown
    refiner_switch: gr.Slider
    image: gr.Image | gr.ImageEditor | None = None  # img2img: the init image; inpaint: the editor (image + drawn mask)
    strength: gr.Slider | None = None
    mask_blur: gr.Slider | None = None  # the InpaintControls, inpaint only
    inpaint_area: gr.Radio | None = None
    padding: gr.Slider | None = None
    invert_mask: gr.Checkbox | None = None
    masked_content: gr.Radio | None = None
    enable_hr: gr.Checkbox | None = None  # the HiresControls, txt2img only
    hr_upscaler: gr.Dropdown | None = None
    hr_scale: gr.Slider | None = None
    hr_steps: gr.Slider | None = None
    hr_strength: gr.Slider | None = None
    control_image: gr.Image | None = None  # the ControlNetControls, every tab
    control_model: gr.Dropdown | None = None
    control_weight: gr.Slider | None = None
    control_start: gr.Slider | None = None
    control_end: gr.Slider | None = None
    control_mode: gr.Radio | None = None
    control_preprocessor: gr.Dropdown | None = None
    distilled_cfg_scale: gr.Slider | None = None  # Flux.1 dev's distilled guidance (shown while dev is loaded)

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def inputs(self) -> list[gr.components.Component]:
        return [getattr(self, name) for name in self.names()]


class WebUI:
    """Builds the Blocks and owns the per-session state (the job a Cancel press refers to)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.session_jobs: dict[str, Job] = {}  # browser session -> its job while it runs (removed after)
        self.distilled_sliders: list[gr.Slider] = []  # each tab's "Distilled CFG scale", shown for Flux.1 dev only
        self.defaulted_sliders: list[tuple[str, gr.Slider]] = []  # (GenerationSpec field, slider): set to the family's defaults

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="optimized-sd", analytics_enabled=False, delete_cache=(1800, 3600)) as blocks:
            with gr.Row():
                gr.Markdown("### optimized-sd: low-VRAM Stable Diffusion")
                self.model_picker()
            with gr.Tabs():
                for task in TASKS:
                    with gr.Tab(task, id=task, elem_id=f"tab-{task}"):
                        self.task_tab(task)
            self.switched.then(self.distilled_visibility, outputs=self.distilled_sliders, queue=False)
            self.switched.then(self.family_values, outputs=[slider for _, slider in self.defaulted_sliders], queue=False)
        return blocks

    # -- layout ------------------------------------------------------------------------------------
    def model_picker(self) -> None:
        catalog = self.service.backend.catalog
        current = self.service.backend.current
        picker = gr.Dropdown(
            choices=[e.title for e in catalog.entries()],
            value=current.title if current else None,
            label="Model",
            elem_id="model-picker",
            scale=2,
        )
        note = gr.HTML(elem_id="model-error")
        self.switched = picker.change(self.switch_model, inputs=[picker], outputs=[note], concurrency_limit=None)

    def task_tab(self, task: str) -> None:
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{task}-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{task}-negative")
                image = strength = None
                inpaint_controls: InpaintControls | None = None
                if task == "img2img":
                    image = gr.Image(label="Init image", type="pil", sources=["upload", "clipboard"], elem_id=f"{task}-init", height=256)
                elif task == "inpaint":
                    image, inpaint_controls = self.inpaint_inputs(task)
                if task in IMAGE_TASKS:
                    strength = gr.Slider(
                        0.0, 1.0, value=DEFAULT_STRENGTH, step=0.01, label="Denoising strength", elem_id=f"{task}-strength"
                    )
                with gr.Row():
                    sampler = gr.Dropdown(
                        choices=[(sampler_display_name(s, False), s) for s in SAMPLERS],
                        value="euler_a",
                        label="Sampler",
                        elem_id=f"{task}-sampler",
                    )
                    karras = gr.Checkbox(label="Karras sigmas", value=False, elem_id=f"{task}-karras")
                start = self.control_defaults()
                with gr.Row():
                    steps = gr.Slider(1, 150, value=start["steps"], step=1, label="Steps", elem_id=f"{task}-steps")
                    cfg_scale = gr.Slider(0.0, 30.0, value=start["cfg_scale"], step=0.5, label=UI_CONTROLS["scale"],
                                          info="1: no CFG pass (Z-Image: 0)", elem_id=f"{task}-cfg")  # fmt: skip
                    distilled = gr.Slider(0.0, 30.0, value=GUIDANCE_DEFAULT, step=0.1, label=UI_CONTROLS["guidance"],
                                          visible=self.service.backend.distilled_guidance, elem_id=f"{task}-distilled-cfg")  # fmt: skip
                    self.distilled_sliders.append(distilled)
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{task}-seed", scale=3)
                    random_seed = gr.Button("random", elem_id=f"{task}-seed-random", scale=1, min_width=80)
                    reuse_seed = gr.Button("reuse last", elem_id=f"{task}-seed-reuse", scale=1, min_width=80)
                with gr.Row():
                    width = gr.Slider(64, 2048, value=start["width"], step=8, label="Width", elem_id=f"{task}-width")
                    height = gr.Slider(64, 2048, value=start["height"], step=8, label="Height", elem_id=f"{task}-height")
                self.defaulted_sliders += [("steps", steps), ("cfg_scale", cfg_scale), ("width", width), ("height", height)]
                with gr.Row():
                    batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size", elem_id=f"{task}-batch-size")
                    n_iter = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id=f"{task}-batch-count")
                hires_controls = self.hires_inputs(task) if task == "txt2img" else None
                control_controls = self.controlnet_inputs(task, self.service.backend.catalog)
                with gr.Row():
                    memory = gr.Dropdown(
                        choices=[SERVER_DEFAULT, *MEMORY_CHOICES], value=SERVER_DEFAULT, label="Memory mode", elem_id=f"{task}-memory-mode"
                    )
                    vram_budget = gr.Textbox(label="VRAM budget (e.g. 2GB; empty: the server's)", elem_id=f"{task}-vram-budget")
                with gr.Row():
                    refiner = gr.Dropdown(
                        choices=[NO_REFINER, *(e.title for e in self.service.backend.catalog.entries())],
                        value=NO_REFINER,
                        label="Refiner (an SDXL refiner after an SDXL base)",
                        elem_id=f"{task}-refiner",
                    )
                    refiner_switch = gr.Slider(
                        0.01, 0.99, value=DEFAULT_REFINER_SWITCH, step=0.01, label="Refiner switch at", elem_id=f"{task}-refiner-switch"
                    )
            with gr.Column(scale=4):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id=f"{task}-cancel")
                status = gr.HTML(progress_html(0.0, "idle", "idle"), elem_id=f"{task}-progress")
                error = gr.HTML(elem_id=f"{task}-error")
                with gr.Row():
                    preview = gr.Image(label="Preview", interactive=False, type="pil", format="png", elem_id=f"{task}-preview", height=192)
                    gallery = gr.Gallery(
                        label="Images",
                        columns=4,
                        height=320,
                        format="png",
                        buttons=["download", "fullscreen"],
                        elem_id=f"{task}-gallery",
                        scale=2,
                    )
                parameters = gr.Textbox(label="Parameters of the selected image", lines=4, interactive=False, elem_id=f"{task}-parameters")
                report = gr.Textbox(label="Memory report of the last run", lines=6, interactive=False, elem_id=f"{task}-memory")
        last_seed = gr.State(-1)
        infotexts = gr.State([])
        inpaint_fields = {f.name: getattr(inpaint_controls, f.name) for f in fields(InpaintControls)} if inpaint_controls else {}
        hires_fields = {f.name: getattr(hires_controls, f.name) for f in fields(HiresControls)} if hires_controls else {}
        control_fields = {f.name: getattr(control_controls, f.name) for f in fields(ControlNetControls)}
        form = TaskForm(
            prompt=prompt,
            negative_prompt=negative,
            sampler=sampler,
            karras=karras,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            width=width,
            height=height,
            batch_size=batch_size,
            n_iter=n_iter,
            memory=memory,
            vram_budget=vram_budget,
            refiner=refiner,
            refiner_switch=refiner_switch,
            image=image,
            strength=strength,
            distilled_cfg_scale=distilled,
            **inpaint_fields,
            **hires_fields,
            **control_fields,
        )
        outputs = [status, error, preview, gallery, parameters, report, last_seed, infotexts]
        names = form.names()

        def run(request: gr.Request, *values: Any) -> Iterator[dict]:  # gradio fills `request`
            yield from self.generate(task, dict(zip(names, values, strict=True)), request, outputs)

        generate.click(run, inputs=form.inputs(), outputs=outputs, concurrency_limit=None)  # our queue serialises
        cancel.click(self.cancel, inputs=None, outputs=None, concurrency_limit=None, queue=False)
        random_seed.click(lambda: -1, outputs=[seed], queue=False)
        reuse_seed.click(lambda last: last, inputs=[last_seed], outputs=[seed], queue=False)
        gallery.select(select_parameters, inputs=[infotexts], outputs=[parameters], queue=False)

    @staticmethod
    def hires_inputs(task: str) -> HiresControls:
        """AUTOMATIC1111's "Hires. fix": a second img2img pass at a larger size, folded away until wanted."""
        with gr.Accordion("Hires fix", open=False, elem_id=f"{task}-hires"):
            enable = gr.Checkbox(label="Hires fix", value=False, elem_id=f"{task}-enable-hr")
            with gr.Row():
                upscaler = gr.Dropdown(choices=[(known.label, name) for name, known in UPSCALERS.items()], value=DEFAULT_HR_UPSCALER,
                                       label="Upscaler", elem_id=f"{task}-hr-upscaler")  # fmt: skip
                scale = gr.Slider(1.0, 4.0, value=DEFAULT_HR_SCALE, step=0.05, label="Upscale by", elem_id=f"{task}-hr-scale")
            with gr.Row():
                steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: the same)", elem_id=f"{task}-hr-steps")
                strength = gr.Slider(0.0, 1.0, value=DEFAULT_HR_STRENGTH, step=0.01, label="Denoising strength",
                                     elem_id=f"{task}-hr-strength")  # fmt: skip
        return HiresControls(enable, upscaler, scale, steps, strength)

    @staticmethod
    def controlnet_inputs(task: str, catalog: ModelCatalog) -> ControlNetControls:
        """One ControlNet unit from the models folder's ControlNet/, folded away until wanted."""
        with gr.Accordion("ControlNet", open=False, elem_id=f"{task}-controlnet"):
            image = gr.Image(label="Control image (empty on img2img: the init image)", type="pil", sources=["upload", "clipboard"],
                             elem_id=f"{task}-control-image", height=192)  # fmt: skip
            with gr.Row():
                model = gr.Dropdown(choices=[NO_CONTROLNET, *(e.model_name for e in catalog.controlnets())], value=NO_CONTROLNET,
                                    label="ControlNet model", elem_id=f"{task}-control-model")  # fmt: skip
                preprocessor = gr.Dropdown(choices=[(label, ours) for label, ours in MODULES.items()], value="none",
                                           label="Preprocessor", elem_id=f"{task}-control-preprocessor")  # fmt: skip
            with gr.Row():
                weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control weight", elem_id=f"{task}-control-weight")
                start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting control step", elem_id=f"{task}-control-start")
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending control step", elem_id=f"{task}-control-end")
            mode = gr.Radio([(name, ours) for ours, name in MODE_NAMES.items()], value="balanced", label="Control mode",
                            elem_id=f"{task}-control-mode")  # fmt: skip
        return ControlNetControls(image, model, weight, start, end, mode, preprocessor)

    @staticmethod
    def inpaint_inputs(task: str) -> tuple[gr.ImageEditor, InpaintControls]:
        """The editor the mask is painted in (one white brush on one layer; PNG, so no pixel of the
        image changes on the way) and the inpainting options."""
        editor = gr.ImageEditor(
            label="Image: upload, then paint over the part to repaint",
            type="pil",
            image_mode="RGBA",
            sources=["upload", "clipboard"],
            brush=gr.Brush(default_size=8, colors=["#ffffff"], color_mode="fixed"),  # radius in image pixels ("auto" swamps small images)
            eraser=gr.Eraser(),
            layers=gr.LayerOptions(allow_additional_layers=False),
            transforms=(),
            format="png",
            elem_id=f"{task}-editor",
            height=360,
        )
        with gr.Row():
            mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (pixels)", elem_id=f"{task}-mask-blur")
            padding = gr.Slider(0, 256, value=32, step=4, label="Only masked: padding (pixels)", elem_id=f"{task}-padding")
        with gr.Row():
            area = gr.Radio(INPAINT_AREAS, value="whole", label="Inpaint area", elem_id=f"{task}-area")
            invert = gr.Checkbox(label="Repaint what is not painted (invert the mask)", value=False, elem_id=f"{task}-invert")
        masked_content = gr.Radio(
            MASKED_CONTENT_CHOICES, value=1, label="Masked content (below strength 1)", elem_id=f"{task}-masked-content"
        )
        return editor, InpaintControls(mask_blur, area, padding, invert, masked_content)

    # -- handlers ----------------------------------------------------------------------------------
    @staticmethod
    def spec_from(task: str, values: dict[str, Any], catalog: ModelCatalog | None = None, distilled: bool = False) -> GenerationSpec:
        """A tab's values by TaskForm field name -> the spec (UserError for what is missing); a refiner is
        named by its title in `catalog`, the server's model list; the distilled CFG scale is sent when
        `distilled` (the loaded model takes it: its slider is shown)."""
        init_image = mask = None
        invert = bool(values.get("invert_mask"))
        if task == "img2img":
            init_image = values["image"]
            if init_image is None:
                raise UserError("img2img needs an init image: upload one first")
        elif task == "inpaint":
            init_image, mask = editor_image_and_mask(values["image"], invert)
        strength, memory, seed = values.get("strength"), values["memory"], values["seed"]
        refiner = None
        if values.get("refiner") not in (None, NO_REFINER):
            entry = catalog.find(values["refiner"]) if catalog is not None else None
            if entry is None:
                raise UserError(f"refiner {values['refiner']!r} is not in the model list any more; refresh the page")
            refiner = entry.path
        return GenerationSpec(
            prompt=values["prompt"] or "",
            negative_prompt=values["negative_prompt"] or "",
            sampler=values["sampler"],
            karras=bool(values["karras"]),
            steps=int(values["steps"]),
            cfg_scale=float(values["cfg_scale"]),
            seed=int(seed) if seed is not None else -1,
            width=int(values["width"]),
            height=int(values["height"]),
            batch_size=int(values["batch_size"]),
            n_iter=int(values["n_iter"]),
            init_image=init_image,
            strength=float(strength) if strength is not None else DEFAULT_STRENGTH,
            mask=mask,
            mask_blur=float(values.get("mask_blur") or 0),
            inpainting_fill=int(values.get("masked_content", 1)),
            inpaint_full_res=values.get("inpaint_area") == "masked",
            inpaint_full_res_padding=int(values.get("padding") or 0),
            invert_mask=invert,
            memory=None if memory in (None, SERVER_DEFAULT) else memory,
            vram_budget=(values["vram_budget"] or "").strip() or None,
            refiner=refiner,
            refiner_switch=float(values.get("refiner_switch") or DEFAULT_REFINER_SWITCH),
            hires=HiresFix(float(values["hr_scale"]), None, values["hr_upscaler"], int(values["hr_steps"]), float(values["hr_strength"]))
            if values.get("enable_hr") else None,
            controlnets=control_units(values, catalog, init_image),
            guidance=float(values["distilled_cfg_scale"]) if distilled and values.get("distilled_cfg_scale") is not None else None,
        )

    def generate(self, task: str, values: dict[str, Any], request: gr.Request, outputs: list) -> Iterator[dict]:
        status, error, preview, gallery, parameters, report, last_seed, infotexts = outputs
        try:
            backend = self.service.backend
            job = self.service.submit_generation(self.spec_from(task, values, backend.catalog, backend.distilled_guidance))
        except UserError as mistake:
            yield {status: progress_html(0.0, "not started", "error"), error: error_html(said(mistake))}
            return
        session = request.session_hash if request is not None else None
        if session:
            self.session_jobs[session] = job
        try:
            shown_step = -1
            yield {error: "", preview: None, status: progress_html(0.0, "queued", "waiting", job)}
            while not job.done.wait(POLL_SECONDS):
                position = self.service.queue.position(job)
                snap = job.snapshot()
                update: dict = {}
                if position > 0:
                    update[status] = progress_html(0.0, wait_text(position), "waiting", job)
                else:
                    batch = f" · batch {snap.batch + 1}/{snap.batches}" if snap.batches > 1 else ""
                    update[status] = progress_html(snap.fraction, f"step {snap.step}/{snap.total}{batch}", "running", job)
                    if snap.latents is not None and snap.latents_step != shown_step:
                        shown_step = snap.latents_step
                        update[preview] = self.service.backend.preview(snap.latents)
                yield update
            try:
                made: Generated = job.wait()
            except JobCancelled:
                yield {status: progress_html(0.0, "cancelled before it started", "cancelled", job)}
                return
            except UserError as mistake:
                yield {status: progress_html(0.0, "failed", "error", job), error: error_html(said(mistake))}
                return
            except Exception as failure:  # the message, not the stack trace (that goes to the server log)
                log.exception("generation failed")
                yield {
                    status: progress_html(0.0, "failed", "error", job),
                    error: error_html(f"generation failed: {type(failure).__name__}: {failure}"),
                }
                return
            texts = [p.text() for p in made.parameters]
            seconds = (job.finished or time.time()) - (job.started or job.created)
            done = (
                f"interrupted after step {made.steps_done}; {len(made.images)} image(s) kept"
                if made.interrupted
                else f"done: {len(made.images)} image(s) in {seconds:.1f} s"
            )
            yield {
                status: progress_html(
                    1.0 if not made.interrupted else job.snapshot().fraction, done, "interrupted" if made.interrupted else "done", job
                ),
                gallery: gallery_images(made),
                parameters: texts[0] if texts else "",
                report: f"mode {made.mode}\n{made.memory_report}",
                last_seed: made.seed,
                infotexts: texts,
            }
        finally:
            if session and self.session_jobs.get(session) is job:
                del self.session_jobs[session]

    def cancel(self, request: gr.Request) -> None:
        job = self.session_jobs.get(request.session_hash) if request is not None else None
        if job is not None:
            self.service.queue.cancel(job)

    def distilled_visibility(self) -> list[dict]:
        """After a model switch: the distilled CFG sliders shown when the model now loaded takes the value."""
        return [gr.update(visible=self.service.backend.distilled_guidance) for _ in self.distilled_sliders]

    def control_defaults(self) -> dict[str, float]:
        """Steps, CFG scale and size for the loaded model: its family's own, or AUTOMATIC1111's (SD)."""
        return self.service.backend.family_defaults() or A1111_UI_DEFAULTS

    def family_values(self) -> list[dict]:
        """After a model switch: the steps, CFG and size sliders set to the defaults of the model now loaded."""
        start = self.control_defaults()
        return [gr.update(value=start[name]) for name, _ in self.defaulted_sliders]

    def switch_model(self, title: str | None) -> str:
        if not title:
            return ""
        entry = self.service.backend.catalog.find(title)
        if entry is None:
            return error_html(f"model {title!r} is no longer in the models folder")
        try:
            self.service.switch_model(entry).wait()
        except UserError as mistake:
            return error_html(str(mistake))
        except Exception as failure:
            log.exception("model switch failed")
            return error_html(f"loading {title} failed: {type(failure).__name__}: {failure}")
        return ""


def control_units(values: dict[str, Any], catalog: ModelCatalog | None, init_image: Image.Image | None) -> tuple[ControlNetSpec, ...]:
    """The tab's ControlNet unit (none while the model is "None"); no control image: the init image, as sd-webui-controlnet."""
    name = values.get("control_model")
    if name in (None, NO_CONTROLNET):
        return ()
    entry = catalog.find_controlnet(name) if catalog is not None else None
    if entry is None:
        raise UserError(f"ControlNet {name!r} is not in the ControlNet folder any more; refresh the page")
    image = values.get("control_image") if values.get("control_image") is not None else init_image
    if image is None:
        raise UserError("ControlNet needs a control image: upload one, or set its model to None")
    return (ControlNetSpec(entry.path, image, float(values["control_weight"]), float(values["control_start"]),
                           float(values["control_end"]), values["control_mode"], preprocessor=values["control_preprocessor"]),)  # fmt: skip


def select_parameters(texts: list[str], event: gr.SelectData) -> str:
    """The parameters text of the gallery image just clicked."""
    index = event.index if isinstance(event.index, int) else 0
    return texts[index] if 0 <= index < len(texts) else ""


def build_ui(service: Service) -> gr.Blocks:
    return WebUI(service).build()
