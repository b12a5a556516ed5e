"""The one request (`Job`) and its front ends' words: each mapping table covers every request field, a
bad value is named in each front end's own words, and serve and batch take every load flag the CLI has."""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import fields
from pathlib import Path

import click
import pytest

import optimized_sd
from optimized_sd import cli
from optimized_sd.batch.jobs import BATCH_KEYS, read_jobs
from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.job import Job, OutputPolicy
from optimized_sd.pipelines.load_options import LoadOptions
from optimized_sd.pipelines.masks import InpaintOptions


def request_fields() -> set[str]:
    """Every field of the request: the Job's, its output policy's and its inpainting options'."""
    return {f.name for kind in (Job, OutputPolicy, InpaintOptions) for f in fields(kind)}


def test_the_cli_and_batch_tables_cover_every_request_field():
    assert set(cli.CLI_FLAGS) == request_fields()
    assert set(BATCH_KEYS) == request_fields()


def test_the_api_and_ui_tables_cover_every_request_field():
    pytest.importorskip("fastapi")
    from optimized_sd.server.backend import API_FIELDS

    assert set(API_FIELDS) == request_fields()
    pytest.importorskip("gradio")
    from optimized_sd.server.ui import UI_CONTROLS

    assert set(UI_CONTROLS) == request_fields()


def options_of(command: click.Command) -> dict[str, list[str]]:
    return {param.name: param.opts for param in command.params if isinstance(param, click.Option)}


def test_every_cli_flag_in_the_table_sets_its_field():
    """A flag CLI_FLAGS names is a real option of a generate command, and its value lands in that field."""
    commands = [options_of(cli.cli.commands[name]) for name in ("txt2img", "img2img", "inpaint")]
    every_flag = {flag for options in commands for opts in options.values() for flag in opts}
    named = {field: flag for field, flag in cli.CLI_FLAGS.items() if flag is not None}
    assert set(named.values()) <= every_flag
    txt2img = options_of(cli.cli.commands["txt2img"])
    for field, flag in named.items():
        if field not in ("prompts",) and field in {f.name for f in fields(Job)} | {f.name for f in fields(OutputPolicy)}:
            owners = [name for name, opts in txt2img.items() if flag in opts]
            assert owners in ([], [field]), (field, owners)  # the click option is called as the field it sets


def test_serve_and_batch_take_every_load_option_the_cli_has():
    loads = {f.name for f in fields(LoadOptions)}
    exposed = {name for name, flag in cli.LOAD_FLAGS.items() if flag is not None}
    assert set(cli.LOAD_FLAGS) == loads
    for name in ("txt2img", "img2img", "inpaint", "batch", "serve"):
        options = options_of(cli.cli.commands[name])
        assert exposed <= set(options), (name, exposed - set(options))
        for option in exposed:
            assert cli.LOAD_FLAGS[option] in options[option], (name, option)


def default_of(param: click.Parameter) -> object:
    """A click option's default, None for none (click 8.2 says UNSET)."""
    return None if param.default is None or type(param.default).__name__ == "Sentinel" else param.default


def test_load_flags_default_to_the_load_options_defaults():
    defaults = LoadOptions()
    for command in ("txt2img", "batch", "serve"):
        given = {p.name: default_of(p) for p in cli.cli.commands[command].params}
        for name, flag in cli.LOAD_FLAGS.items():
            if flag is not None:
                assert given[name] == getattr(defaults, name) or (given[name], getattr(defaults, name)) == (None, False), (command, name)


def test_load_and_the_pipeline_class_take_the_load_options_defaults():
    """`load` has no defaults of its own (it takes a LoadOptions, or its fields as keywords), and the pipeline
    class's keyword defaults are LoadOptions' for every option it takes: the defaults cannot drift apart."""
    from optimized_sd.pipelines.diffusion import StableDiffusion, load

    Parameter = inspect.Parameter
    loading = [(name, p.kind, p.default) for name, p in inspect.signature(load).parameters.items()]
    assert loading == [
        ("checkpoint", Parameter.POSITIONAL_ONLY, Parameter.empty),
        ("options", Parameter.POSITIONAL_ONLY, None),
        ("fields", Parameter.VAR_KEYWORD, Parameter.empty),
    ]
    init = inspect.signature(StableDiffusion.__init__).parameters
    taken = {name: p.default for name, p in init.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert taken == LoadOptions().pipeline_kwargs()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main([str(a) for a in argv])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--unet_bs", "0"], "error: --unet_bs must be at least 1\n"),
        (["--C", "0"], "error: --C 0 must be at least 1\n"),
        (["--ddim_steps", "0"], "error: --ddim_steps must be at least 1 (at most 1000), got 0\n"),
        (["--sampler", "plms", "--ddim_eta", "0.5"], "error: --ddim_eta 0.5: plms supports eta 0 only (as CompVis)\n"),
    ],
)
def test_the_cli_names_a_bad_value_by_its_flag(capsys, tmp_path, argv, message):
    code, err = run_cli(capsys, "txt2img", "--ckpt", tmp_path / "never-loaded.ckpt", "--outdir", tmp_path / "out", *argv)
    assert (code, err) == (1, message)


def test_the_batch_driver_names_the_line_and_its_key(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in ({"prompt": "a"}, {"prompt": "b", "inpaint_area": "most", "mask": "m.png",
                                                                                                   "init_image": "i.png"})))  # fmt: skip
    with pytest.raises(UserError) as refused:
        read_jobs(path, Job(output=OutputPolicy(tmp_path)))
    assert not isinstance(refused.value, FieldError)
    assert str(refused.value) == f"{path} line 2: field 'inpaint_area' 'most' is unknown; use whole or masked"


def test_a_library_error_names_the_request_field_not_a_flag():
    with pytest.raises(FieldError) as refused:
        Job(prompts=("a",), unet_batch=0).validate()
    assert (refused.value.field, str(refused.value)) == ("unet_batch", "unet_batch must be at least 1")
    assert cli.flag_words(refused.value) == "--unet_bs must be at least 1"


# Modules that are front ends themselves: their errors are about their own flags (the CLI, the demo script, serve's
# start-up options, the bench command's options, the inspect command's report).
FRONT_ENDS = ("cli.py", "demo.py", "server/app.py", "server/catalog.py", "benchmark/", "weights/inspect.py")
FLAG_WORD = re.compile(r"(?<![\w-])--[a-zA-Z]")
FLAG = re.compile(r"--[a-zA-Z][\w-]*(\s|$)")


def flagged(node: ast.AST | None, whole: bool = False) -> list[tuple[int, str]]:
    """(line, text) of `node` when it is a string holding a flag word (`whole`: one that is a flag and nothing else),
    or an f-string that starts with a flag (`f"--lora {text}"`)."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return []
    found = FLAG.match(node.value) if whole else FLAG_WORD.search(node.value)
    return [(node.lineno, node.value)] if found else []


def flag_words_raised(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of each string in a `raise` statement or a message constant (`NAME = "..."`) that holds a
    flag word, and of each flag handed on to a callee or a table (`open_taesd(path, "--vae")`, `{"vae": "--vae"}`):
    words the callee would put in its errors."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            found += [hit for part in ast.walk(node.exc) for hit in flagged(part)] if node.exc is not None else []
        elif isinstance(node, ast.Assign):
            found += flagged(node.value)
        elif isinstance(node, ast.Call):
            found += [hit for value in [*node.args, *(k.value for k in node.keywords)] for hit in flagged(value, whole=True)]
        elif isinstance(node, ast.Dict):
            found += [hit for value in node.values for hit in flagged(value, whole=True)]
    return found


def test_no_library_error_speaks_in_flag_words():
    """A library check raises a FieldError naming the field, so each front end words it (the CLI its flag, the API
    its field, the batch driver its line and key); only the front ends' own modules say flags."""
    package = Path(optimized_sd.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith(FRONT_ENDS):
            continue
        offenders += [f"{relative}:{line}: {text!r}" for line, text in flag_words_raised(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == []


def test_the_cli_says_the_library_s_field_errors_with_its_flags():
    """Errors that once spoke in flags (the preview options, --turbo, --ray) now name fields, and the CLI says them
    with the same flags as before."""
    from optimized_sd.batch.ray_pool import check_reachable
    from optimized_sd.pipelines.job import memory_mode
    from optimized_sd.pipelines.previews import preview_decoder_path

    cases = [
        (lambda: preview_decoder_path("taesd", None, None, 1), "--preview-decoder is needed for taesd previews"),
        (lambda: preview_decoder_path("latent", Path("taesd_decoder.pth"), None, 1), "--preview latent uses no decoder"),
        (lambda: preview_decoder_path("blur", None, None, 1), "--preview 'blur' is unknown"),
        (lambda: memory_mode("stream", True), "--turbo is the turbo memory mode, which the memory mode 'stream' contradicts"),
        (lambda: check_reachable("nowhere"), "--ray nowhere: give HOST:PORT"),
    ]
    for make, words in cases:
        with pytest.raises(FieldError) as refused:
            make()
        assert "--" not in str(refused.value) and cli.flag_words(refused.value).startswith(words), str(refused.value)
