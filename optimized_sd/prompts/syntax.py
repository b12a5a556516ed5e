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

Every reader here is one forward scan, linear in the prompt's length: a prompt comes from a network
client too, and the regexes this replaced backtracked quadratically (40,000 spaces took 27 s under the
GIL). Regexes only match short tokens at a known position, each quantifier over a class the next element
cannot match. `check_prompt` bounds what a prompt may ask for (config: MAX_PROMPT_CHARS, MAX_PROMPT_CHUNKS,
MAX_EMPHASIS_WEIGHT).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from optimized_sd.config import (
    MAX_EMPHASIS_NESTING,
    MAX_EMPHASIS_WEIGHT,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_CHUNKS,
    check_lora_weight,
)
from optimized_sd.errors import FieldError, UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# The lexical elements AUTOMATIC1111 reads besides plain text: an escaped bracket or backslash (a literal
# character), a lone backslash (dropped), a bracket, a colon. Splitting on them (in C) leaves the text between.
_ATTENTION_MARK = re.compile(r"(\\[()\[\]\\]?|[()\[\]:])")
_WEIGHT_BODY = re.compile(r"\s*([+-]?[.\d]+)\s*")  # between ':' and ')': '(x:1.3)' weighs 1.3
_WORD_CHAR = re.compile(r"\w")
BREAK_WORD = "BREAK"
_NETWORK_TAG_HEAD = re.compile(r"<(\w+):")  # a network tag's `<kind:`; its arguments run to the next '>'
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


class _BracketNesting:
    """The brackets of one kind as a tree (they nest within a kind): node 0 stands for "none open", and a
    bracket's factor is its default unless it closed otherwise; a bracket never closed keeps it."""

    def __init__(self, default: float) -> None:
        self.default = default
        self.parent = [0]
        self.closed: dict[int, tuple[int, float]] = {}  # node -> (when it closed: the count of closings before, factor)
        self.open = [0]  # the open brackets, innermost last

    @property
    def depth(self) -> int:
        return len(self.open) - 1

    def push(self) -> None:
        self.parent.append(self.open[-1])
        self.open.append(len(self.parent) - 1)

    def close(self, factor: float, time: int) -> None:
        self.closed[self.open.pop()] = (time, factor)

    def around(self, node: int) -> tuple[list[tuple[int, float]], list[float]]:
        """The brackets around `node` (itself included): the closed ones as (closing time, factor),
        innermost first, and the factors of those never closed, outermost first."""
        closed, unclosed = [], []
        while node:
            if node in self.closed:
                closed.append(self.closed[node])
            else:
                unclosed.append(self.default)
            node = self.parent[node]
        return closed, unclosed[::-1]


class _AttentionScan:
    """One forward scan of a prompt's emphasis: the runs of text, each with the innermost brackets around it,
    and the bracket trees (their weights are computed after the scan)."""

    def __init__(self) -> None:
        self.rounds, self.squares = _BracketNesting(ROUND_MULTIPLIER), _BracketNesting(SQUARE_MULTIPLIER)
        self.by_bracket = {"(": self.rounds, ")": self.rounds, "[": self.squares, "]": self.squares}
        self.runs: list[tuple[str, tuple[int, int]] | None] = []  # (text, (round node, square node)) or None for a BREAK
        self.pieces: list[str] = []  # the text since the last bracket or BREAK
        self.closings = itertools.count()  # the order brackets close in
        self.nesting = 0  # the brackets around each run of text, summed: the multiplications their weights cost

    def read(self, text: str) -> None:
        tokens = _ATTENTION_MARK.split(text)  # text, mark, text, mark, ..., text (texts may be empty)
        self.add_text(tokens[0])
        index = 1
        while index < len(tokens):
            mark, following = tokens[index], tokens[index + 1]
            index += 2
            weight = self.weight_token(mark, following, tokens[index] if index < len(tokens) else None)
            if weight is not None:  # '(x:1.3)': the colon, the number and the bracket are one token
                self.end_run()
                self.rounds.close(_number(weight.group(1), f":{following})"), next(self.closings))
                following = tokens[index + 1]
                index += 2
            else:
                self.read_mark(mark)
            self.add_text(following)
        self.end_run()

    def weight_token(self, mark: str, following: str, next_mark: str | None) -> re.Match[str] | None:
        """The number of a `:1.3)` that closes an open round bracket, else None."""
        if mark == ":" and self.rounds.depth and next_mark == ")":
            return _WEIGHT_BODY.fullmatch(following)
        return None

    def read_mark(self, mark: str) -> None:
        """A mark that is not part of a weight: an escape, a bracket, or text."""
        if mark[0] == "\\":
            self.pieces.append(mark[1:])  # a lone backslash reads as nothing, as AUTOMATIC1111
        elif mark == "(" or mark == "[":
            self.end_run()
            self.by_bracket[mark].push()
        elif mark != ":" and self.by_bracket[mark].depth:  # a closing bracket
            self.end_run()
            brackets = self.by_bracket[mark]
            brackets.close(brackets.default, next(self.closings))
        else:  # a colon that is not a weight, or a closing bracket nothing opened (AUTOMATIC1111 keeps it as text)
            self.pieces.append(mark)

    def end_run(self) -> None:
        if self.pieces:
            self.runs.append(("".join(self.pieces), (self.rounds.open[-1], self.squares.open[-1])))
            self.pieces.clear()
            self.nesting += self.rounds.depth + self.squares.depth
            if self.nesting > MAX_EMPHASIS_NESTING:
                limit = MAX_EMPHASIS_NESTING
                raise UserError(f"emphasis brackets nest too deeply: its pieces of text sit inside over {limit:,} brackets in all")

    def add_text(self, plain: str) -> None:
        if not plain:  # (between two marks)
            return
        if BREAK_WORD not in plain:
            self.pieces.append(plain)
            return
        for index, piece in enumerate(_break_pieces(plain)):
            if index:
                self.end_run()
                self.runs.append(None)
            self.pieces.append(piece)


def parse_attention(text: str) -> list[Segment]:
    """Split text into weighted segments (and BREAK markers), adjacent equal weights merged.

    'a (b:1.5) [c]' -> [Segment('a ', 1), Segment('b', 1.5), Segment(' ', 1), Segment('c', 1/1.1)].
    One scan records the brackets around each run of text; the weights are computed after it
    (`_bracket_weights`): multiplying every enclosed piece at each closing bracket was quadratic.
    """
    scan = _AttentionScan()
    scan.read(text)
    weights = _bracket_weights(dict.fromkeys(run[1] for run in scan.runs if run is not None), scan.rounds, scan.squares)
    return _merge_runs(scan.runs, weights)


def _bracket_weights(pairs: Iterable[tuple[int, int]], rounds: _BracketNesting, squares: _BracketNesting) -> dict[tuple[int, int], float]:
    """The weight of the text inside each (round node, square node), multiplied as AUTOMATIC1111 does, bit
    for bit: 1.0 times each enclosing bracket's factor as it closes, then the unclosed round brackets', then
    the unclosed square ones', outermost first. That is one multiplication per bracket around each run of
    text: the scan has bounded their total (MAX_EMPHASIS_NESTING)."""
    weights = {}
    for r, s in pairs:
        (closed_rounds, open_rounds), (closed_squares, open_squares) = rounds.around(r), squares.around(s)
        weight = 1.0
        for factor in [f for _, f in sorted(closed_rounds + closed_squares)] + open_rounds + open_squares:
            weight *= factor
        weights[r, s] = weight
    return weights


def _merge_runs(runs: list[tuple[str, tuple[int, int]] | None], weights: dict[tuple[int, int], float]) -> list[Segment]:
    """Segments of the runs' weights, adjacent equal weights joined and empty text dropped; a weight that is
    not finite or past +-MAX_EMPHASIS_WEIGHT is refused (8,000 nested brackets give 1.1 ** 8000 = inf)."""
    merged: list[tuple[list[str], float] | None] = []
    for run in runs:
        if run is None:
            merged.append(None)
            continue
        piece, nodes = run
        if not piece:  # nothing to tokenize (e.g. around a BREAK)
            continue
        weight = weights[nodes]
        if not math.isfinite(weight) or abs(weight) > MAX_EMPHASIS_WEIGHT:
            shown = piece if len(piece) <= 40 else piece[:37] + "..."
            raise UserError(f"the emphasis on {shown!r} weighs {weight:g}; a weight must be finite and within +-{MAX_EMPHASIS_WEIGHT:g}")
        last = merged[-1] if merged else None
        if last is not None and last[1] == weight:
            last[0].append(piece)
        else:
            merged.append(([piece], weight))
    segments = [BREAK if item is None else Segment("".join(item[0]), item[1]) for item in merged]
    return segments or [Segment("", 1.0)]


def _break_pieces(text: str) -> list[str]:
    """The text between whole-word BREAKs, blanks next to a BREAK dropped (AUTOMATIC1111 splits on
    `\\s*\\bBREAK\\b\\s*`; a regex search for that backtracks quadratically over a long run of blanks)."""
    pieces: list[str] = []
    start = 0
    found = text.find(BREAK_WORD)
    while found != -1:
        end = found + len(BREAK_WORD)
        if not _is_word_char(text, found - 1) and not _is_word_char(text, end):
            piece = text[start:found].rstrip()
            pieces.append(piece.lstrip() if pieces else piece)
            start = end
        found = text.find(BREAK_WORD, found + 1)
    pieces.append(text[start:].lstrip() if pieces else text)
    return pieces


def _is_word_char(text: str, index: int) -> bool:
    """Whether text[index] exists and is a regex word character (`\\b`'s test)."""
    return 0 <= index < len(text) and _WORD_CHAR.match(text, index) is not None


def _number(raw: str, context: str) -> float:
    try:
        return float(raw)
    except ValueError:  # e.g. '1.2.3' matches [.\d]+
        raise UserError(f"{context!r} is not a valid emphasis weight") from None


def extract_loras(text: str) -> tuple[str, list[LoraTag]]:
    """Remove every `<kind:args>` network tag from the prompt (as AUTOMATIC1111) and return the
    LoRA ones; `<lora:NAME>` weighs 1. Tags of other kinds are removed and rejected."""
    tags: list[LoraTag] = []
    unknown: list[str] = []
    kept: list[str] = []
    copied = 0  # text before this index is in `kept` or in a tag
    opening = text.find("<")
    while opening != -1:
        head = _NETWORK_TAG_HEAD.match(text, opening)
        closing = text.find(">", head.end()) if head is not None else opening
        if closing == -1:
            break  # no '>' after this '<': none after a later one either
        if head is not None and closing > head.end():  # `<kind:` and at least one character of arguments
            tag = text[opening : closing + 1]
            lora = _lora_tag(tag, head.group(1), text[head.end() : closing])
            if lora is None:
                unknown.append(tag)
            else:
                tags.append(lora)
            kept.append(text[copied:opening])
            copied = closing + 1
            opening = text.find("<", copied)
        else:
            opening = text.find("<", opening + 1)
    kept.append(text[copied:])
    if unknown:
        raise UserError(f"unsupported network tag {unknown[0]} (only <lora:NAME:WEIGHT> is supported)")
    return "".join(kept), tags


def _lora_tag(tag: str, kind: str, arguments: str) -> LoraTag | None:
    """`<kind:arguments>` as a LoraTag, or None for a kind other than LoRA."""
    if kind.lower() not in LORA_TAG_KINDS:
        return None
    args = arguments.split(":")
    name = args[0].strip()
    if not name:
        raise UserError(f"{tag} names no LoRA")
    if len(args) > 2:
        raise UserError(f"{tag}: separate text-encoder/UNet weights are not supported; write <{kind}:{name}:WEIGHT>")
    weight = 1.0
    if len(args) == 2:
        weight = check_lora_weight(args[1], tag)
    return LoraTag(name, weight)


# A subprompt weight: a number (inf and nan too, so that they are refused by `subprompt_mix` rather
# than read as words) running to the next space. (`\d+\.?\d*` would backtrack quadratically over a long
# run of digits: `\d+(?:\.\d*)?` reads the same numbers in one way only.)
WEIGHT_AFTER_COLON = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+|inf|nan))(?=\s|$)", re.IGNORECASE)
_SUBPROMPT_MARK = re.compile(r"[\\()\[\]:]")  # the characters split_subprompts looks at


def split_subprompts(text: str) -> list[tuple[str, float]]:
    """optimizedSD's weighted subprompts: 'tabby cat:0.25 white duck:0.75 hybrid' ->
    [('tabby cat', 0.25), ('white duck', 0.75), ('hybrid', 1.0)].

    Only a colon at bracket depth 0 (not escaped) directly followed by a number splits; the number
    runs to the next space. Empty parts are dropped; a prompt with no split is one part weighing 1.
    """
    parts: list[tuple[str, float]] = []
    depth, start = 0, 0
    mark = _SUBPROMPT_MARK.search(text)
    while mark is not None:
        index, char = mark.start(), mark.group(0)
        after = index + 1
        if char == "\\":
            after = index + 2
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth = max(depth - 1, 0)
        elif depth == 0:  # a colon
            match = WEIGHT_AFTER_COLON.match(text, index + 1)
            if match:
                parts.append((text[start:index].strip(), float(match.group(1))))
                after = start = match.end()
        mark = _SUBPROMPT_MARK.search(text, after)
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


def check_prompt(prompt: str, name: str = "prompt", field: str = "prompts") -> None:
    """Refuse, in one line naming the prompt (`name`: 'prompt' or 'negative prompt'; `field`: the request
    field, so the API names it), what the model cannot take, before any model is loaded: more than
    MAX_PROMPT_CHARS characters, an unpaired surrogate (argv decoded with surrogateescape, JSON's
    "\\ud800": not text a tokenizer can read), a network tag, subprompt weight or emphasis that does not
    parse, or more BREAKs than MAX_PROMPT_CHUNKS chunks hold (the token count, which needs the tokenizer,
    is bounded by `encoding.build_chunks`)."""
    problem = _prompt_problem(prompt)
    if isinstance(problem, UserError):  # the syntax's own word on it
        raise FieldError(field, f"{name}: {problem}", f"is refused: {problem}")
    if problem is not None:
        raise FieldError(field, f"the {name} {problem}", problem)


def _prompt_problem(prompt: str) -> str | UserError | None:
    """What is wrong with `prompt` (see `check_prompt`): a predicate ("is ... long"), the parser's error, or None."""
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # UTF-8 encodes every code point but a surrogate
        code = ord(prompt[error.start])
        return f"holds an unpaired surrogate (U+{code:04X}) at position {error.start}: it is not valid text"
    try:
        text, _ = extract_loras(prompt)
        parts, _ = subprompt_mix(text)
        for part in parts:
            breaks = sum(segment.is_break for segment in parse_attention(part))
            if breaks >= MAX_PROMPT_CHUNKS:
                return UserError(f"{breaks:,} BREAKs make more than the {MAX_PROMPT_CHUNKS} chunks of 75 tokens a prompt may use")
    except UserError as error:
        return error
    return None


def check_prompts(prompts: Iterable[str], negative_prompt: str | None = None) -> None:
    """`check_prompt` on each distinct prompt and on the negative prompt: the one check every way in
    (CLI, API, batch files, the library's request) goes through."""
    for prompt in dict.fromkeys(prompts):
        check_prompt(prompt)
    if negative_prompt is not None:
        check_prompt(negative_prompt, "negative prompt", "negative_prompt")
