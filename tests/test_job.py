"""The typed job: the CLI builds one from flags; any other caller can build it and get the same files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import optimized_sd
from optimized_sd.cli import main
from optimized_sd.errors import UserError
from optimized_sd.pipelines.job import Job, JobStep, OutputPolicy, run_job

ROOT = Path(__file__).resolve().parents[1]


IMPORT_CHECK = """
import sys
import optimized_sd.pipelines.job, optimized_sd.pipelines.diffusion
assert "click" not in sys.modules, "click imported"
ours = [m for name, m in list(sys.modules.items()) if name.startswith("optimized_sd")]
def origin(value):
    return (getattr(value, "__module__", None) or getattr(value, "__name__", "") or "").split(".")[0]
uses = sorted(f"{m.__name__}.{k}" for m in ours for k, v in vars(m).items() if origin(v) in ("click", "tqdm"))
assert not uses, uses
"""


def test_importing_the_job_imports_neither_click_nor_tqdm():
    """click must stay out of the process; torch itself imports tqdm (torch.hub), so for tqdm the
    check is that no module of ours holds anything of it."""
    subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True, cwd=ROOT)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_job_from_python_writes_what_the_cli_writes(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    flags = [
        "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "cli",
        "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "2", "--device", "cpu", "--seed", "9",
        "--from-file", prompts, "--sampler", "euler", "--n_rows", "3", "--negative-prompt", "dull",
    ]  # fmt: skip
    main([str(flag) for flag in flags])
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu")
    job = Job(
        prompt_file=prompts, negative_prompt="dull", seed=9, n_samples=2, n_iter=2, steps=2, sampler="euler", height=64, width=64,
        output=OutputPolicy(tmp_path / "api", n_rows=3),
    )  # fmt: skip
    steps: list[JobStep] = []
    result = run_job(pipe, job, steps.append)
    assert files(tmp_path / "api") == files(tmp_path / "cli") and len(result.written) == 9  # 8 images and the grid
    assert result.seeds == [9, 10, 11, 12, 13, 14, 15, 16] and result.pipeline is pipe
    assert [(s.batch, s.info.step) for s in steps if s.info.step in (0, 2)] == [(b, i) for b in range(4) for i in (0, 2)]


def test_job_checks_before_loading(tmp_path):
    loads = []
    for job, message in [
        (Job(), "no prompt given"),
        (Job(prompts=("a",), n_iter=0), "n_iter must be at least 1"),
        (Job(prompts=("a",), sampler="nope"), "'nope' is unknown"),
        (Job(prompts=("a",), init_image=tmp_path / "missing.png"), "init image not found"),
        (Job(prompt_file=tmp_path / "none.txt"), "not found"),
    ]:
        with pytest.raises(UserError, match=message):
            run_job(lambda: loads.append(1), job)
    assert loads == []
