"""Hardening of the pipeline's outputs and inputs: every bad input is one `error:` line, exit status 1,
no traceback and nothing written (not even an empty --outdir); outputs are written whole or not at
all and never over an existing file; no computed image is lost at save time."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from cli_runs import run_cli as run
from PIL import Image

from optimized_sd.errors import UserError
from optimized_sd.pipelines import output
from optimized_sd.pipelines.output import ImageParameters, prompt_folder, read_parameters, write_exclusive, write_new


@pytest.fixture
def base(tiny_model, tmp_path):
    return [
        "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--sampler", "ddim",
    ]


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


# -- crafted inputs (made by the tests; no binary fixtures) --------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header declaring width x height with almost no pixel data: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def broken_chunk_png(path: Path) -> None:
    Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
    data = bytearray(path.read_bytes())
    data[29] ^= 0xFF  # inside the IHDR CRC: PIL raises SyntaxError ("broken PNG file")
    path.write_bytes(bytes(data))


def unknown_dds(path: Path) -> None:
    """A DDS header with a FourCC no decoder knows (PIL raises NotImplementedError)."""
    header = bytearray(128)
    header[0:4] = b"DDS "
    struct.pack_into("<IIII", header, 4, 124, 0x1007, 64, 64)  # size, flags, height, width
    struct.pack_into("<II", header, 76, 32, 0x4)  # pixel format: size, DDPF_FOURCC
    header[84:88] = b"ZZZZ"
    path.write_bytes(bytes(header) + b"\x00" * 4096)


def truncated_png(path: Path) -> None:
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])


def init_image_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    cases = {}
    broken = tmp_path / "broken.png"
    broken_chunk_png(broken)
    cases["broken PNG chunk"] = (broken, [], f"init image {broken} is not a readable image")
    dds = tmp_path / "odd.dds"
    unknown_dds(dds)
    cases["unknown DDS pixel format"] = (dds, [], f"init image {dds} is not a readable image")
    short = tmp_path / "short.png"
    truncated_png(short)
    cases["truncated PNG"] = (short, [], f"init image {short} is not a readable image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(10_000, 10_000))  # past PIL's warning threshold, below its hard error
    cases["decompression bomb"] = (bomb, [], "10000x10000 (100,000,000 pixels), over the limit of 89,478,485")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(20_000, 20_000))
    cases["decompression bomb past PIL's hard limit"] = (huge, ["--max-image-pixels", str(10**9)], "more pixels than PIL ever decodes")
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    cases["pixel limit flag"] = (small, ["--max-image-pixels", "1000"], "over the limit of 1,000")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    cases["FIFO"] = (fifo, [], "is a FIFO, not a regular file")  # opening it to read would block forever
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "broken PNG chunk", "unknown DDS pixel format", "truncated PNG", "decompression bomb",
        "decompression bomb past PIL's hard limit", "pixel limit flag", "FIFO",
    ],)
def test_bad_init_image_is_one_line(capsys, base, tmp_path, case):
    path, extra, message = init_image_cases(tmp_path)[case]
    code, _, err = run(capsys, "img2img", *base, "--init-img", path, *extra)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_pixel_limit_from_the_environment(capsys, base, tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    monkeypatch.setenv("OPTIMIZED_SD_MAX_IMAGE_PIXELS", "4095")
    code, _, err = run(capsys, "img2img", *base, "--init-img", small)
    assert_one_line_error(code, err, "over the limit of 4,095")
    monkeypatch.setenv("OPTIMIZED_SD_MAX_IMAGE_PIXELS", "4096")
    assert run(capsys, "img2img", *base, "--init-img", small, "--skip_grid")[0] == 0


def bad_flag_cases(tmp_path: Path, tiny_model) -> dict[str, tuple[list, str]]:
    bad_vocab = tmp_path / "tok"
    bad_vocab.mkdir()
    (bad_vocab / "vocab.json").write_text("{not json")
    (bad_vocab / "merges.txt").write_bytes((Path(tiny_model.tokenizer) / "merges.txt").read_bytes())
    configs = {
        "config not an object": "[1, 2]",
        "config wrong type": json.dumps({"unet": {"model_channels": "32"}}),
        "config negative size": json.dumps({"unet": {"channel_mult": [1, -2]}}),
        "config section not an object": json.dumps({"vae": 3}),
        "config nested without end": "[" * 50_000,
    }
    for name, text in configs.items():
        (tmp_path / f"{name}.json").write_text(text)
    big_prompts = tmp_path / "big.txt"
    big_prompts.write_text("a prompt\n" * 20)  # over the limit the test sets
    return {
        "f zero": (["--f", "0"], "--f 0 must be at least 1"),
        "C zero": (["--C", "0"], "--C 0 must be at least 1"),
        "budget overflow": (["--vram-budget", "9" * 400 + "GB"], "beyond any machine's memory"),
        "seed at 2^64": (["--seed", str(2**64)], "must be between 0 and 2^64-1"),
        "negative seed": (["--seed", "-1"], "must be between 0 and 2^64-1"),
        "seeds run past 2^64": (["--seed", str(2**64 - 2), "--n_samples", "2", "--n_iter", "2"], "seeds past 2^64-1"),
        "config not an object": (["--config", tmp_path / "config not an object.json"], "the top level must be a JSON object"),
        "config wrong type": (["--config", tmp_path / "config wrong type.json"], "unet.model_channels must be a whole number"),
        "config negative size": (["--config", tmp_path / "config negative size.json"], "unet.channel_mult must be a whole number"),
        "config section not an object": (["--config", tmp_path / "config section not an object.json"], "vae must be a JSON object"),
        "config nested without end": (["--config", tmp_path / "config nested without end.json"], "cannot read config"),
        "tokenizer vocab not JSON": (["--tokenizer", bad_vocab], "cannot read the tokenizer in"),
        "prompt file over the cap": (["--from-file", big_prompts], "is over"),
        "scale nan": (["--scale", "nan"], "--scale must be a finite number, not nan"),
        "scale inf": (["--scale", "inf"], "--scale must be a finite number, not inf"),
        "eta nan": (["--ddim_eta", "nan"], "--ddim_eta must be a finite number"),
        "weights sum to 0": (["--prompt", "a cat:1 a dog:-1"], "must be finite numbers that do not sum to 0"),
        "weight not finite": (["--prompt", "a cat:inf a dog:1"], "must be finite numbers that do not sum to 0"),
        "weight nan": (["--prompt", "a cat:nan a dog:1"], "must be finite numbers that do not sum to 0"),
        "negative prompt weights": (["--negative-prompt", "x:1 y:-1"], "must be finite numbers that do not sum to 0"),
        "CPU RAM, forced full": (["--memory", "full", "--H", "20000", "--W", "20000"], "RAM (available)"),
        "CPU RAM, forced stream": (["--memory", "stream", "--H", "20000", "--W", "20000"], "would fit"),
    }


BAD_FLAGS = [
    "f zero", "C zero", "budget overflow", "seed at 2^64", "negative seed", "seeds run past 2^64", "config not an object",
    "config wrong type", "config negative size", "config section not an object", "config nested without end",
    "tokenizer vocab not JSON", "prompt file over the cap", "scale nan", "scale inf", "eta nan", "weights sum to 0",
    "weight not finite", "weight nan", "negative prompt weights", "CPU RAM, forced full", "CPU RAM, forced stream",
]


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_is_one_line_and_creates_nothing(capsys, base, tmp_path, tiny_model, monkeypatch, case):
    monkeypatch.setattr("optimized_sd.pipelines.prompts.MAX_PROMPT_FILE_BYTES", 100)
    extra, message = bad_flag_cases(tmp_path, tiny_model)[case]
    if "--tokenizer" in extra:  # --tokenizer is repeatable (Flux.1: a CLIP and a T5 folder): the bad one replaces the base's
        at = base.index("--tokenizer")
        base = [*base[:at], *base[at + 2 :]]
    code, _, err = run(capsys, "txt2img", *base, *extra)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_strength_nan_is_one_line(capsys, base, tmp_path):
    init = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(init)
    code, _, err = run(capsys, "img2img", *base, "--init-img", init, "--strength", "nan")
    assert_one_line_error(code, err, "--strength must be a finite number, not nan")
    assert not (tmp_path / "out").exists()


def test_last_seed_below_2_64_is_accepted(capsys, base, tmp_path):
    code, _, err = run(capsys, "txt2img", *base, "--seed", str(2**64 - 2), "--n_samples", "2", "--skip_grid")
    assert code == 0, err
    assert sorted(p.name.split("_")[1] for p in files(tmp_path / "out")) == [str(2**64 - 2), str(2**64 - 1)]


def test_an_error_after_flag_parsing_leaves_no_output_folder(capsys, base, tmp_path):
    """A mismatch found only with the model loaded (--C 8) still creates nothing."""
    code, _, err = run(capsys, "txt2img", *base, "--C", "8")
    assert_one_line_error(code, err, "--C 8")
    assert not (tmp_path / "out").exists()


# -- output: checked before sampling, written whole, never replaced -------------------------------


def test_report_json_is_never_overwritten(capsys, base, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("mine")
    code, _, err = run(capsys, "txt2img", *base, "--report-json", report)
    assert_one_line_error(code, err, "exists; it is never overwritten")
    assert report.read_text() == "mine"
    assert not (tmp_path / "out").exists()
    fresh = tmp_path / "fresh.json"
    assert run(capsys, "txt2img", *base, "--report-json", fresh, "--skip_grid")[0] == 0
    assert "stages" in json.loads(fresh.read_text())


def test_prompt_folder_that_is_a_file_is_refused_before_sampling(capsys, base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_cat").write_text("in the way")
    code, _, err = run(capsys, "txt2img", *base, "--prompt", "a cat")
    assert_one_line_error(code, err, "exists and is not a folder")
    assert files(tmp_path / "out") == [tmp_path / "out" / "a_cat"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_prompt_folder_is_refused_before_sampling(capsys, base, tmp_path):
    folder = tmp_path / "out" / "a_cat"
    folder.mkdir(parents=True)
    folder.chmod(0o500)
    try:
        code, _, err = run(capsys, "txt2img", *base, "--prompt", "a cat")
    finally:
        folder.chmod(0o700)
    assert_one_line_error(code, err, "is not writable")


def test_cjk_and_emoji_prompts_fit_the_name_limit(capsys, base, tmp_path):
    prompt = "猫が宇宙を飛ぶ🚀" * 60  # 480 characters, about 1,500 bytes of UTF-8
    code, _, err = run(capsys, "txt2img", *base, "--outdir", tmp_path / "o", "--prompt", prompt, "--skip_grid")
    assert code == 0, err
    (image,) = files(tmp_path / "o")
    assert len(os.fsencode(image.parent.name)) <= 255
    assert read_parameters(image).splitlines()[0] == prompt  # the metadata keeps the whole prompt


def test_prompt_folder_names_are_cut_at_255_bytes_between_characters():
    folder = prompt_folder(Path("o"), "🚀" * 100 + "x")
    assert len(os.fsencode(folder.name)) <= 255 and folder.name == "🚀" * 63
    assert prompt_folder(Path("o"), "a\nb c:d").name == "a_b_c_d"


def test_jpeg_parameters_too_long_for_exif_go_to_a_side_file(capsys, base, tmp_path):
    prompt = ("ü" + " " * 99) * 400 + "ü"  # 80 KB of UTF-16 (over a JPEG's 64 KB EXIF segment) in under 32 chunks of tokens
    code, _, err = run(capsys, "txt2img", *base, "--prompt", prompt, "--format", "jpg", "--n_samples", "2")
    assert code == 0, err
    written = files(tmp_path / "out")
    names = sorted(p.name for p in written)
    # optimizedSD counts the folder's files, the side file included
    assert names == ["grid_00000.jpg", "grid_00000.txt", "seed_5_00000.jpg", "seed_5_00000.txt", "seed_6_00002.jpg", "seed_6_00002.txt"]
    side = next(p for p in written if p.name == "seed_5_00000.txt")
    assert side.read_text().splitlines()[0] == prompt
    assert "Seed: 5" in side.read_text()
    assert "they are in seed_5_00000.txt" in err
    Image.open(side.with_suffix(".jpg")).verify()


def test_prompt_newlines_cannot_forge_metadata_lines():
    parameters = ImageParameters(
        prompt="a cat\nNegative prompt: forged\r\nSteps: 99, Seed: 1", negative_prompt="", steps=2, sampler="DDIM",
        cfg_scale=7.5, seed=5, width=64, height=64, model_hash="abc", model_name="my, model: v2",
    )
    lines = parameters.text().splitlines()
    assert lines[0] == "a cat Negative prompt: forged Steps: 99, Seed: 1"
    assert len(lines) == 2 and lines[1].startswith("Steps: 2, ")
    assert lines[1].endswith('Model: "my, model: v2"')  # AUTOMATIC1111's quoting of a value with ',' or ':'


# -- the writers ---------------------------------------------------------------------------------


def test_write_new_never_replaces_and_leaves_no_temp_file(tmp_path):
    first = write_new(tmp_path, "seed_1", "png", b"one", 0)
    second = write_new(tmp_path, "seed_1", "png", b"two", 0)
    assert (first.name, second.name) == ("seed_1_00000.png", "seed_1_00001.png")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_exclusive(first, b"three")
    assert first.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_1_00000.png", "seed_1_00001.png"]


def fail_midway(monkeypatch) -> None:
    """Every file opened through os.fdopen takes half its bytes, then the disk is full."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(output.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))


def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    fail_midway(monkeypatch)
    with pytest.raises(UserError, match="No space left on device"):
        write_new(tmp_path, "seed_1", "png", b"x" * 1000, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_run_is_one_line_and_leaves_no_partial_file(capsys, base, tmp_path, monkeypatch):
    fail_midway(monkeypatch)
    code, _, err = run(capsys, "txt2img", *base)
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar (a run that failed at save time)
    assert last.startswith("error: cannot write ") and last.endswith("seed_5_00000.png: No space left on device")
    assert files(tmp_path / "out") == []


def test_without_hard_links_the_name_is_still_never_replaced(tmp_path, monkeypatch):
    def no_links(*_):
        raise PermissionError(errno.EPERM, "links not supported")

    monkeypatch.setattr(output.os, "link", no_links)
    path = write_new(tmp_path, "grid", "png", b"one", 0)
    assert write_new(tmp_path, "grid", "png", b"two", 0).name == "grid_00001.png"
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid_00000.png", "grid_00001.png"]


# -- memory: the CPU allocator's failure is an out-of-memory like CUDA's ---------------------------


CPU_ALLOCATOR_ERROR = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"


def test_cpu_allocation_failure_takes_the_fallback_ladder(tiny_model):
    import optimized_sd
    from optimized_sd.memory.planner import Request

    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", memory="full")
    pipe.memory.prepare(Request(64, 64, dtype_bytes=4))
    attempts = []

    def work(record):
        attempts.append(pipe.memory.mode)
        if len(attempts) == 1:
            raise RuntimeError(CPU_ALLOCATOR_ERROR)
        return "done"

    assert pipe.memory.run_stage("unet", work) == "done"
    assert attempts == ["full", "turbo"]

    def always(record):
        raise RuntimeError(CPU_ALLOCATOR_ERROR)

    with pytest.raises(UserError, match="out of memory during unet"):
        pipe.memory.run_stage("unet", always)

    def other(record):
        raise RuntimeError("a shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        pipe.memory.run_stage("unet", other)
    pipe.close()


def test_planner_on_cpu_says_what_fits():
    from optimized_sd.memory.planner import ModelFootprint, Request, plan_memory

    model = ModelFootprint(100 * 2**20, 800 * 2**20, (400 * 2**20, 400 * 2**20), (50 * 2**20,) * 16, 60 * 2**20, 90 * 2**20)
    with pytest.raises(UserError) as refused:
        plan_memory(model, Request(20_000, 20_000, dtype_bytes=4), budget=4 * 2**30, mode="full", device_type="cpu")
    message = str(refused.value)
    assert "a RAM (available) of 4.00 GB is below the smallest plan" in message
    side = int(message.rsplit("image(s) of ", 1)[1].split("x")[0])
    assert side % 64 == 0 and side > 0
    fitting = plan_memory(model, Request(side, side, dtype_bytes=4), budget=4 * 2**30, mode="stream", device_type="cpu")
    assert fitting.mode == "stream"
    with pytest.raises(UserError):
        plan_memory(model, Request(side + 64, side + 64, dtype_bytes=4), budget=4 * 2**30, mode="stream", device_type="cpu")
