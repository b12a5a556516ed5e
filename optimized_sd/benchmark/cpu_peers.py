"""The CPU peers users pick over diffusers: stable-diffusion.cpp (through stable-diffusion-cpp-python)
and the OpenVINO runtime. Each runs the same random full-size checkpoint as ours and reports the same
`ScenarioResult`; the worker imports this module only for their scenarios.

stable-diffusion.cpp reads the LDM single-file checkpoint itself (its own CLIP tokenizer, weights
converted to `wtype` at load). OpenVINO runs models converted once from diffusers' pipeline over the
same file (`openvino.convert_model`, saved as IR beside the checkpoint, in a process of its own so the
conversion's memory is not the measured run's), in a DDIM loop of diffusers' scheduler like the one
optimum-intel's pipelines run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from optimized_sd.benchmark.results import ScenarioResult, ScenarioTask, StageFigures
from optimized_sd.benchmark.scenarios import Scenario
from optimized_sd.errors import UserError

SDCPP_WEIGHTS = "f16"  # what stable-diffusion.cpp converts the weights to at load (q8_0 also measured in issue 16)
SDCPP_SAMPLER = "ddim_trailing"  # its DDIM
LATENT_SCALE = 0.18215  # SD 1.5's VAE scaling factor


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def finish(
    scenario: Scenario, load_seconds: float, started: float, stages: dict[str, StageFigures], rss_after_load: float, finite: bool
) -> ScenarioResult:
    return ScenarioResult(
        scenario=scenario,
        ok=True,
        mode_used=scenario.mode,
        load_seconds=load_seconds,
        total_seconds=time.perf_counter() - started,
        stages=stages,
        rss_after_load_mib=rss_after_load,
        finite=finite,
    )


def check_cpu_txt2img(scenario: Scenario, device) -> None:
    if device.type != "cpu":
        raise UserError(f"{scenario.mode} runs on the CPU here (its CPU build), not on {device}")
    if scenario.kind != "txt2img":
        raise UserError(f"{scenario.mode}: only txt2img is benchmarked")


# --------------------------------------------------------------------------- stable-diffusion.cpp
def run_sdcpp(task: ScenarioTask, scenario: Scenario, device) -> ScenarioResult:
    """Load the checkpoint into stable-diffusion.cpp, then generate `batch` images `n_iter` times;
    the UNet stage's time is the sum of the per-step times it reports, the rest (text, VAE) is `other`."""
    import numpy as np
    import torch
    from stable_diffusion_cpp import StableDiffusion

    from optimized_sd.benchmark.worker import PROMPT, SCALE, SEED

    check_cpu_txt2img(scenario, device)
    start = time.perf_counter()
    engine = StableDiffusion(
        model_path=task.checkpoint, wtype=SDCPP_WEIGHTS, n_threads=torch.get_num_threads(), vae_decode_only=True, verbose=False
    )
    load_seconds = time.perf_counter() - start
    rss_after_load = rss_mib()
    step_seconds: list[float] = []

    def progress(step: int, steps: int, seconds: float) -> None:
        step_seconds.append(seconds)

    started = time.perf_counter()
    images = []
    for call in range(scenario.n_iter):
        images += engine.generate_image(
            prompt=PROMPT,
            width=scenario.width,
            height=scenario.height,
            cfg_scale=SCALE,
            sample_method=SDCPP_SAMPLER,
            sample_steps=scenario.steps,
            seed=SEED + call,
            batch_count=scenario.batch,
            progress_callback=progress,
        )
    total = time.perf_counter() - started
    unet = sum(step_seconds[-scenario.steps * scenario.images :])
    stages = {
        "unet": StageFigures(seconds=unet, steps=scenario.steps * scenario.images, peak_rss_mib=rss_mib()),
        "other": StageFigures(seconds=max(total - unet, 0.0), peak_rss_mib=rss_mib()),
    }
    finite = all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in images) and len(images) == scenario.images
    return finish(scenario, load_seconds, started, stages, rss_after_load, finite)


# --------------------------------------------------------------------------- OpenVINO
def openvino_folder(task: ScenarioTask, scenario: Scenario) -> Path:
    """Where the converted models for this size and batch live, beside the checkpoint."""
    cfg_batch = scenario.batch * 2
    return Path(task.checkpoint).parent / f"openvino-{scenario.width}x{scenario.height}-b{cfg_batch}"


OV_PARTS = ("text_encoder", "unet", "vae_decoder")


def convert_openvino(checkpoint: str, diffusers_config: str, folder: Path, height: int, width: int, cfg_batch: int) -> None:
    """Convert diffusers' text encoder, UNet and VAE decoder for one size and CFG batch to OpenVINO IR
    (weights compressed to fp16 in the files, as optimum-intel exports them)."""
    import openvino as ov
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(checkpoint, config=diffusers_config, local_files_only=True, torch_dtype=torch.float32)
    latent = (cfg_batch, pipe.unet.config.in_channels, height // 8, width // 8)
    context = (cfg_batch, 77, pipe.text_encoder.config.hidden_size)

    for part in (pipe.text_encoder, pipe.unet, pipe.vae):
        part.requires_grad_(False)

    class Part(torch.nn.Module):
        """One component with a plain tensor output (the tracer needs the component registered)."""

        def __init__(self, inner: torch.nn.Module, call) -> None:
            super().__init__()
            self.inner, self.call = inner, call

        def forward(self, *args):
            return self.call(self.inner, *args)

    examples = {
        "text_encoder": (
            Part(pipe.text_encoder, lambda m, ids: m(ids, return_dict=False)[0]),
            (torch.ones(cfg_batch, 77, dtype=torch.long),),
        ),
        "unet": (
            Part(pipe.unet, lambda m, x, t, c: m(x, t, encoder_hidden_states=c, return_dict=False)[0]),
            (torch.randn(latent), torch.tensor(999.0), torch.randn(context)),
        ),
        "vae_decoder": (Part(pipe.vae, lambda m, z: m.decode(z, return_dict=False)[0]), (torch.randn(1, *latent[1:]),)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for name, (module, example) in examples.items():
            ov.save_model(ov.convert_model(module.eval(), example_input=example), folder / f"{name}.xml")
    (folder / "done.json").write_text(json.dumps({"checkpoint": checkpoint, "parts": list(OV_PARTS)}))


def ensure_openvino(task: ScenarioTask, scenario: Scenario) -> Path:
    """The converted models, converting them in a separate process on first use (its memory and time
    are not the measured run's: users convert once)."""
    folder = openvino_folder(task, scenario)
    if (folder / "done.json").is_file():
        return folder
    args = [task.checkpoint, task.diffusers_config, str(folder), str(scenario.height), str(scenario.width), str(scenario.batch * 2)]
    done = subprocess.run([sys.executable, "-m", "optimized_sd.benchmark.cpu_peers", "convert", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"OpenVINO conversion failed: {tail}")
    return folder


def run_openvino(task: ScenarioTask, scenario: Scenario, device) -> ScenarioResult:
    """DDIM with classifier-free guidance over the compiled text encoder, UNet and VAE decoder."""
    import numpy as np
    import openvino as ov
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    from optimized_sd.benchmark.worker import PROMPT, SCALE, SEED

    check_cpu_txt2img(scenario, device)
    folder = ensure_openvino(task, scenario)
    start = time.perf_counter()
    core = ov.Core()
    compiled = {name: core.compile_model(folder / f"{name}.xml", "CPU") for name in OV_PARTS}
    tokenizer = CLIPTokenizer.from_pretrained(Path(task.diffusers_config) / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(Path(task.diffusers_config) / "scheduler")
    load_seconds = time.perf_counter() - start
    rss_after_load = rss_mib()
    stages: dict[str, StageFigures] = {}

    def timed(name: str, work, steps: int = 0):
        began = time.perf_counter()
        value = work()
        figures = StageFigures(seconds=time.perf_counter() - began, steps=steps, peak_rss_mib=rss_mib())
        stages[name] = stages[name].then(figures) if name in stages else figures
        return value

    def text() -> np.ndarray:
        prompts = [""] * scenario.batch + [PROMPT] * scenario.batch  # unconditional half first
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        return compiled["text_encoder"](ids.astype(np.int64))[0]

    def sample(context: np.ndarray, call: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(SEED + call)
        latents = torch.randn((scenario.batch, 4, scenario.height // 8, scenario.width // 8), generator=generator)
        scheduler.set_timesteps(scenario.steps)
        for t in scheduler.timesteps:
            both = np.concatenate([latents.numpy()] * 2)
            eps = torch.from_numpy(compiled["unet"]([both, np.array(float(t), dtype=np.float32), context])[0])
            uncond, cond = eps.chunk(2)
            latents = scheduler.step(uncond + SCALE * (cond - uncond), t, latents).prev_sample
        return latents.numpy()

    def decode(latents: np.ndarray) -> list[np.ndarray]:
        return [compiled["vae_decoder"](latents[i : i + 1] / LATENT_SCALE)[0] for i in range(latents.shape[0])]

    started = time.perf_counter()
    images: list[np.ndarray] = []
    for call in range(scenario.n_iter):
        context = timed("text", text)
        latents = timed("unet", lambda context=context, call=call: sample(context, call), steps=scenario.steps)
        images += timed("vae_decode", lambda latents=latents: decode(latents))
    finite = all(np.isfinite(image).all() for image in images)
    return finish(scenario, load_seconds, started, stages, rss_after_load, finite)


if __name__ == "__main__":  # the conversion, in a process of its own
    if len(sys.argv) != 8 or sys.argv[1] != "convert":
        print("usage: python -m optimized_sd.benchmark.cpu_peers convert CHECKPOINT CONFIG FOLDER HEIGHT WIDTH CFG_BATCH", file=sys.stderr)
        sys.exit(2)
    convert_openvino(sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
