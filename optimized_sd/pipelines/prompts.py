"""Prompt files (`Job.prompt_file`, the CLI's --from-file); the prompt syntax itself lives in `optimized_sd.prompts`."""

from __future__ import annotations

from pathlib import Path

from optimized_sd.errors import FieldError

MAX_PROMPT_FILE_BYTES = 16 * 2**20  # --from-file reads at most this much (a bound, not a real limit: ~100k prompts)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-empty line, from a file of at most MAX_PROMPT_FILE_BYTES (read bounded, so
    a huge file or an endless stream is refused instead of filling the memory)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise FieldError.about("prompt_file", f"{path} is over {MAX_PROMPT_FILE_BYTES // 2**20} MB; split it")
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise FieldError.about("prompt_file", f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FieldError.about("prompt_file", f"cannot read {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise FieldError.about("prompt_file", f"{path} holds no prompt")
    return prompts
