"""Prompt handling shared by every pipeline: weighted subprompts and prompt files."""

from __future__ import annotations

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


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--from-file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--from-file: cannot read {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--from-file: {path} holds no prompt")
    return prompts
