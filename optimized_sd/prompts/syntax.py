"""AUTOMATIC1111's prompt syntax, read as plain text (no torch): network tags, emphasis, BREAK, and
optimizedSD's weighted subprompts.

The order matches AUTOMATIC1111: `<lora:...>` tags are removed from the whole prompt first, then
(ours) the prompt is split into optimizedSD's weighted subprompts, then each part is read for
emphasis. Where both syntaxes could apply, a colon inside brackets belongs to AUTOMATIC1111
(`(cat:1.2)` is emphasis), a colon at bracket depth 0 followed by a number ends an optimizedSD
subprompt (`cat:0.25 dog:0.75`), and any other colon is plain text (AUTOMATIC1111 reads it so).

Emphasis follows AUTOMATIC1111's `prompt_parser.parse_prompt_attention`: `(x)` multiplies by 1.1,
`[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal
characters (a lone backslash vanishes), an unmatched `)` or `]` is literal text, a bracket left open at the end still applies
to everything after it, and `BREAK` (a whole word, upper case) starts a new 75-token chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from optimized_sd.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per lexical element, tried in order (the same elements AUTOMATIC1111 reads).
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]              # escaped bracket or backslash: a literal character
    | \\                      # a lone backslash (dropped)
    | \(                      # open round
    | \[                      # open square
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ':1.3)' closes a round bracket with an explicit weight
    | \)                      # close round
    | \]                      # close square
    | [^\\()\[\]:]+           # plain text
    | :                       # a colon that is not a weight: plain text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_KINDS = ("lora", "lyco")  # AUTOMATIC1111 reads `lyco` as an alias of `lora`


@dataclass(frozen=True)
class Segment:
    """A run of prompt text sharing one emphasis weight; `is_break` marks a BREAK (text '')."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Segment("", 1.0, is_break=True)


@dataclass(frozen=True)
class LoraTag:
    """`<lora:NAME:WEIGHT>` as written in a prompt."""

    name: str
    weight: float = 1.0


def parse_attention(text: str) -> list[Segment]:
    """Split text into weighted segments (and BREAK markers), adjacent equal weights merged.

    'a (b:1.5) [c]' -> [Segment('a ', 1), Segment('b', 1.5), Segment(' ', 1), Segment('c', 1/1.1)].
    """
    parts: list[list] = []  # [text, weight] or BREAK, mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for index in range(start, len(parts)):
            if parts[index] is not BREAK:
                parts[index][1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])  # a lone backslash reads as nothing, as AUTOMATIC1111
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _number(weight, token))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a closing bracket nothing opened (AUTOMATIC1111 keeps it as text)
            for index, piece in enumerate(_BREAK.split(token)):
                if index:
                    parts.append(BREAK)
                parts.append([piece, 1.0])
    for start in open_round:  # brackets never closed apply to the end, as AUTOMATIC1111
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[Segment] = []
    for part in parts:
        if part is BREAK:
            merged.append(BREAK)
        elif not part[0]:  # nothing to tokenize (e.g. around a BREAK)
            continue
        elif merged and not merged[-1].is_break and merged[-1].weight == part[1]:
            merged[-1] = Segment(merged[-1].text + part[0], part[1])
        else:
            merged.append(Segment(part[0], part[1]))
    return merged or [Segment("", 1.0)]


def _number(raw: str, context: str) -> float:
    try:
        return float(raw)
    except ValueError:  # e.g. '1.2.3' matches [.\d]+
        raise UserError(f"prompt: {context!r} is not a valid emphasis weight") from None


def extract_loras(text: str) -> tuple[str, list[LoraTag]]:
    """Remove every `<kind:args>` network tag from the prompt (as AUTOMATIC1111) and return the
    LoRA ones; `<lora:NAME>` weighs 1. Tags of other kinds are removed and rejected."""
    tags: list[LoraTag] = []
    unknown: list[str] = []

    def found(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind.lower() not in LORA_TAG_KINDS:
            unknown.append(match.group(0))
            return ""
        name = args[0].strip()
        if not name:
            raise UserError(f"prompt: {match.group(0)} names no LoRA")
        if len(args) > 2:
            raise UserError(
                f"prompt: {match.group(0)}: separate text-encoder/UNet weights are not supported; write <{kind}:{name}:WEIGHT>"
            )
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise UserError(f"prompt: {match.group(0)}: the weight {args[1]!r} is not a number") from None
        tags.append(LoraTag(name, weight))
        return ""

    stripped = _NETWORK_TAG.sub(found, text)
    if unknown:
        raise UserError(f"prompt: unsupported network tag {unknown[0]} (only <lora:NAME:WEIGHT> is supported)")
    return stripped, tags


# A subprompt weight: a number (inf and nan too, so that they are refused by `subprompt_mix` rather
# than read as words) running to the next space.
WEIGHT_AFTER_COLON = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+|inf|nan))(?=\s|$)", re.IGNORECASE)


def split_subprompts(text: str) -> list[tuple[str, float]]:
    """optimizedSD's weighted subprompts: 'tabby cat:0.25 white duck:0.75 hybrid' ->
    [('tabby cat', 0.25), ('white duck', 0.75), ('hybrid', 1.0)].

    Only a colon at bracket depth 0 (not escaped) directly followed by a number splits; the number
    runs to the next space. Empty parts are dropped; a prompt with no split is one part weighing 1.
    """
    parts: list[tuple[str, float]] = []
    depth, start, index = 0, 0, 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(depth - 1, 0)
        elif char == ":" and depth == 0:
            match = WEIGHT_AFTER_COLON.match(text, index + 1)
            if match:
                parts.append((text[start:index].strip(), float(match.group(1))))
                index = start = match.end()
                continue
        index += 1
    parts.append((text[start:].strip(), 1.0))
    kept = [(part, weight) for part, weight in parts if part]
    return kept or [("", 1.0)]


def subprompt_mix(prompt: str) -> tuple[list[str], list[float]]:
    """The texts to encode and their weights, normalised to sum to 1 (optimizedSD's mix of weighted
    subprompts; a prompt with one part is itself at weight 1). Weights that are not finite or that
    sum to 0 would give NaN or a zero context (a black image), so they are refused."""
    pairs = split_subprompts(prompt)
    if len(pairs) == 1:
        return [pairs[0][0]], [1.0]
    weights = [weight for _, weight in pairs]
    total = sum(weights)
    if not all(math.isfinite(w) for w in weights) or not math.isfinite(total) or total == 0:
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise UserError(f"the subprompt weights of {shown!r} must be finite numbers that do not sum to 0 (they sum to {total:g})")
    return [text for text, _ in pairs], [w / total for w in weights]
