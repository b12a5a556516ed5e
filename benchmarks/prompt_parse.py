#!/usr/bin/env python
"""Prompt parsing stays linear: each adversarial prompt of `--size` characters (default 1 MB, 16 times the
64k cap that `check_prompt` enforces) goes through the three readers a prompt meets (`extract_loras`,
`split_subprompts`, `parse_attention`) in well under a second. Before round 3, 40,000 spaces took 27 s
(a `\\s*\\bBREAK\\b\\s*` search), and unclosed brackets, `:` + digits and `<a:` runs were quadratic too.

A reader may refuse a prompt (a weight past the bound, an unsupported tag): that is a result too, and
it must come as fast. Times are the process's CPU seconds (the parse is one thread; on a shared machine
wall time also counts the other processes). Exit status 1 when any kind takes `--limit` seconds or more.

    python benchmarks/prompt_parse.py [--size 1000000] [--limit 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.errors import UserError  # noqa: E402
from optimized_sd.prompts.syntax import extract_loras, parse_attention, split_subprompts  # noqa: E402


def repeated(unit: str, size: int, head: str = "", tail: str = "") -> str:
    """head + unit repeated to about `size` characters + tail."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


ADVERSARIAL: dict[str, Callable[[int], str]] = {
    "spaces": lambda n: repeated(" ", n, "a", "x"),
    "colon weight": lambda n: repeated("1", n, "a:", "x"),
    "colon weight in brackets": lambda n: repeated("1", n, "(a:", "x"),
    "colon then spaces": lambda n: repeated(" ", n, "(a:", "x"),
    "network tags": lambda n: repeated("<a:", n),
    "unclosed round brackets": lambda n: repeated("(a", n),
    "unclosed square brackets": lambda n: repeated("[a", n),
    "nested brackets": lambda n: "(" * (n // 2) + "a" + ")" * (n // 2),
    "nested, balanced weight": lambda n: repeated("([", n // 2) + "a" + "])" * (n // 4),
    "deep then many pieces": lambda n: "([" * 50 + repeated("(a)", n - 100),
    "many BREAKs": lambda n: repeated("BREAK ", n),
    "BREAK look-alikes": lambda n: repeated("BREAKx", n),
    "escapes": lambda n: repeated("\\(", n),
    "subprompt colons": lambda n: repeated("a:1 ", n),
}


def timed(read: Callable[[str], object], text: str) -> tuple[float, str]:
    """CPU seconds one reader takes on `text`, and what it gave: a count of parts, or the refusal."""
    start = time.process_time()
    try:
        result = read(text)
        outcome = f"{len(result[1] if isinstance(result, tuple) else result):,} parts"
    except UserError as error:
        outcome = f"refused: {str(error)[:60]}"
    return time.process_time() - start, outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="characters per adversarial prompt")
    parser.add_argument("--limit", type=float, default=1.0, help="seconds each kind must stay under")
    args = parser.parse_args(argv)
    slow = []
    print(f"{'kind':<26} {'tags s':>7} {'subprompts s':>12} {'emphasis s':>10}  emphasis result")
    for kind, make in ADVERSARIAL.items():
        text = make(args.size)
        times = [timed(read, text) for read in (extract_loras, split_subprompts, parse_attention)]
        total = sum(seconds for seconds, _ in times)
        print(f"{kind:<26} {times[0][0]:>7.3f} {times[1][0]:>12.3f} {times[2][0]:>10.3f}  {times[2][1]}")
        if total >= args.limit:
            slow.append(kind)
    if slow:
        print(f"over {args.limit} s: {', '.join(slow)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
