"""The gradio web UI: one tab per task, built by one function, over the shared job queue.

Each Generate press queues a job and then polls it, streaming the progress bar (with the place in the
queue while it waits) and a latent preview every few steps; Cancel stops the session's own job at the
next step (or takes it out of the queue). Errors are shown as one message, never a stack trace."""

import html
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from optimized_sd.errors import UserError
from optimized_sd.sampling import SAMPLERS, sampler_display_name
from optimized_sd.server.backend import MEMORY_CHOICES, Generated, GenerationSpec
from optimized_sd.server.jobs import Job, JobCancelled
from optimized_sd.server.preview import latent_preview
from optimized_sd.server.service import Service

log = logging.getLogger("optimized_sd")

POLL_SECONDS = 0.15
SERVER_DEFAULT = "server default"
TASKS = ("txt2img", "img2img")


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


@dataclass
class TaskForm:
    """The inputs of one tab, in the order the generate handler takes them."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    init_image: gr.Image | None
    strength: gr.Slider | None
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

    def inputs(self) -> list[gr.components.Component]:
        fields = [self.prompt, self.negative_prompt, self.init_image, self.strength, self.sampler, self.karras, self.steps]
        fields += [self.cfg_scale, self.seed, self.width, self.height, self.batch_size, self.n_iter, self.memory, self.vram_budget]
        return [f for f in fields if f is not None]


class WebUI:
    """Builds the Blocks and owns the per-session state (the job a Cancel press refers to)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.session_jobs: dict[str, Job] = {}  # browser session -> its job while it runs (removed after)

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="optimized-sd", analytics_enabled=False, delete_cache=(1800, 3600)) as blocks:
            with gr.Row():
                gr.Markdown("### optimized-sd: low-VRAM Stable Diffusion")
                self.model_picker()
            with gr.Tabs():
                for task in TASKS:
                    with gr.Tab(task, id=task, elem_id=f"tab-{task}"):
                        self.task_tab(task)
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
        picker.change(self.switch_model, inputs=[picker], outputs=[note], concurrency_limit=None)

    def task_tab(self, task: str) -> None:
        img2img = task == "img2img"
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{task}-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{task}-negative")
                init_image = strength = None
                if img2img:
                    init_image = gr.Image(
                        label="Init image", type="pil", sources=["upload", "clipboard"], elem_id=f"{task}-init", height=256
                    )
                    strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id=f"{task}-strength")
                with gr.Row():
                    sampler = gr.Dropdown(
                        choices=[(sampler_display_name(s, False), s) for s in SAMPLERS],
                        value="euler_a",
                        label="Sampler",
                        elem_id=f"{task}-sampler",
                    )
                    karras = gr.Checkbox(label="Karras sigmas", value=False, elem_id=f"{task}-karras")
                with gr.Row():
                    steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id=f"{task}-steps")
                    cfg_scale = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale", elem_id=f"{task}-cfg")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{task}-seed", scale=3)
                    random_seed = gr.Button("random", elem_id=f"{task}-seed-random", scale=1, min_width=80)
                    reuse_seed = gr.Button("reuse last", elem_id=f"{task}-seed-reuse", scale=1, min_width=80)
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{task}-width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{task}-height")
                with gr.Row():
                    batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size", elem_id=f"{task}-batch-size")
                    n_iter = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id=f"{task}-batch-count")
                with gr.Row():
                    memory = gr.Dropdown(
                        choices=[SERVER_DEFAULT, *MEMORY_CHOICES], value=SERVER_DEFAULT, label="Memory mode", elem_id=f"{task}-memory-mode"
                    )
                    vram_budget = gr.Textbox(label="VRAM budget (e.g. 2GB; empty: the server's)", elem_id=f"{task}-vram-budget")
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
        form = TaskForm(
            prompt,
            negative,
            init_image,
            strength,
            sampler,
            karras,
            steps,
            cfg_scale,
            seed,
            width,
            height,
            batch_size,
            n_iter,
            memory,
            vram_budget,
        )
        outputs = [status, error, preview, gallery, parameters, report, last_seed, infotexts]
        img2img_flag = gr.State(img2img)

        def run(request: gr.Request, is_img2img: bool, *values: Any) -> Iterator[dict]:  # gradio fills `request`
            yield from self.generate(is_img2img, values, request, outputs)

        generate.click(run, inputs=[img2img_flag, *form.inputs()], outputs=outputs, concurrency_limit=None)  # our queue serialises
        cancel.click(self.cancel, inputs=None, outputs=None, concurrency_limit=None, queue=False)
        random_seed.click(lambda: -1, outputs=[seed], queue=False)
        reuse_seed.click(lambda last: last, inputs=[last_seed], outputs=[seed], queue=False)
        gallery.select(select_parameters, inputs=[infotexts], outputs=[parameters], queue=False)

    # -- handlers ----------------------------------------------------------------------------------
    def spec_from(self, img2img: bool, values: tuple) -> GenerationSpec:
        values = list(values)
        prompt, negative = values.pop(0), values.pop(0)
        init_image = strength = None
        if img2img:
            init_image, strength = values.pop(0), values.pop(0)
            if init_image is None:
                raise UserError("img2img needs an init image: upload one first")
        sampler, karras, steps, cfg_scale, seed, width, height, batch_size, n_iter, memory, budget = values
        return GenerationSpec(
            prompt=prompt or "",
            negative_prompt=negative or "",
            sampler=sampler,
            karras=bool(karras),
            steps=int(steps),
            cfg_scale=float(cfg_scale),
            seed=int(seed) if seed is not None else -1,
            width=int(width),
            height=int(height),
            batch_size=int(batch_size),
            n_iter=int(n_iter),
            init_image=init_image,
            strength=float(strength) if strength is not None else 0.75,
            memory=None if memory in (None, SERVER_DEFAULT) else memory,
            vram_budget=(budget or "").strip() or None,
        )

    def generate(self, img2img: bool, values: tuple, request: gr.Request, outputs: list) -> Iterator[dict]:
        status, error, preview, gallery, parameters, report, last_seed, infotexts = outputs
        try:
            job = self.service.submit_generation(self.spec_from(img2img, values))
        except UserError as mistake:
            yield {status: progress_html(0.0, "not started", "error"), error: error_html(str(mistake))}
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
                        update[preview] = latent_preview(snap.latents)
                yield update
            try:
                made: Generated = job.wait()
            except JobCancelled:
                yield {status: progress_html(0.0, "cancelled before it started", "cancelled", job)}
                return
            except UserError as mistake:
                yield {status: progress_html(0.0, "failed", "error", job), error: error_html(str(mistake))}
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


def select_parameters(texts: list[str], event: gr.SelectData) -> str:
    """The parameters text of the gallery image just clicked."""
    index = event.index if isinstance(event.index, int) else 0
    return texts[index] if 0 <= index < len(texts) else ""


def build_ui(service: Service) -> gr.Blocks:
    return WebUI(service).build()
