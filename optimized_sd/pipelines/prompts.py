"""Prompt handling shared by every pipeline: weighted subprompts and prompt files."""

from __future__ import annotations

import math
import re
from pathlib import Path

from optimized_sd.errors import UserError


def split_weighted_subprompts(text: str) -> tuple[list[str], list[float]]:
    """'tabby cat:0.25 white duck:0.75 hybrid' -> (['tabby cat', 'white duck', 'hybrid'], [0.25, 0.75, 1.0]).

    As optimizedSD: a weight is read after ':' up to the next space; text without one weighs 1.0; an
    unreadable weight (as in 'a:b c') falls back to 1.0 with the rest kept as text."""
    prompts: list[str] = []
    weights: list[float] = []
    rest = text
    while rest:
        colon = rest.find(":")
        if colon < 0:
            prompts.append(rest.strip())
            weights.append(1.0)
            break
        prompt = rest[:colon].strip()
        after = rest[colon + 1 :]
        match = re.match(r"\s*([^\s]*)\s*", after)
        raw_weight = match.group(1) if match else ""
        try:
            weight = float(raw_weight)
        except ValueError:
            weight = 1.0
        prompts.append(prompt)
        weights.append(weight)
        rest = after[match.end() if match else 0 :]
    pairs = [(p, w) for p, w in zip(prompts, weights) if p]
    return [p for p, _ in pairs], [w for _, w in pairs]


def prompt_mix(prompt: str) -> tuple[list[str], list[float]]:
    """The texts to encode and their weights, normalised to sum to 1 (optimizedSD's mix of weighted
    subprompts; a prompt with one part is itself at weight 1). Weights that are not finite or that
    sum to 0 would give NaN or a zero context (a black image), so they are refused."""
    parts, weights = split_weighted_subprompts(prompt)
    if len(parts) <= 1:
        return [prompt], [1.0]
    total = sum(weights)
    if not all(math.isfinite(w) for w in weights) or not math.isfinite(total) or total == 0:
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise UserError(f"the subprompt weights of {shown!r} must be finite numbers that do not sum to 0 (they sum to {total:g})")
    return parts, [w / total for w in weights]


MAX_PROMPT_FILE_BYTES = 16 * 2**20  # --from-file reads at most this much (a bound, not a real limit: ~100k prompts)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-empty line, from a file of at most MAX_PROMPT_FILE_BYTES (read bounded, so
    a huge file or an endless stream is refused instead of filling the memory)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise UserError(f"--from-file: {path} is over {MAX_PROMPT_FILE_BYTES // 2**20} MB; split it")
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--from-file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--from-file: cannot read {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--from-file: {path} holds no prompt")
    return prompts
