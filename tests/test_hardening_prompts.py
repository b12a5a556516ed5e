"""Hardening of prompt reading: linear parsing that reads every prompt as before (checked against the
regex parser it replaced, kept here as the oracle), bounded prompts (characters, chunks, emphasis
weights, bracket nesting, text that is not text), and a mean restoration that never divides 0 by 0."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from cli_runs import run_cli

from optimized_sd.config import MAX_EMPHASIS_NESTING, MAX_PROMPT_CHARS, MAX_PROMPT_CHUNKS, TINY
from optimized_sd.errors import UserError
from optimized_sd.pipelines.job import Job
from optimized_sd.pipelines.request import GenerationRequest, check_request
from optimized_sd.prompts.encoding import PromptEncoder, PromptTokens, SpecialTokens, build_chunks, encode_chunks
from optimized_sd.prompts.syntax import BREAK, Segment, check_prompt, extract_loras, parse_attention, split_subprompts

# -- the oracle: the regex parser before round 3 (quadratic on some inputs; only small prompts here) ------

_ORACLE_TOKEN = re.compile(
    r"""\\[()\[\]\\] | \\ | \( | \[ | :\s*(?P<weight>[+-]?[.\d]+)\s*\) | \) | \] | [^\\()\[\]:]+ | :""", re.VERBOSE
)
_ORACLE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ORACLE_TAG = re.compile(r"<(\w+):([^>]+)>")
_ORACLE_WEIGHT_AFTER_COLON = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+|inf|nan))(?=\s|$)", re.IGNORECASE)


def _oracle_multiply_from(parts: list, start: int, factor: float) -> None:
    for index in range(start, len(parts)):
        if parts[index] is not None:
            parts[index][1] *= factor


def _oracle_read_token(token: str, weight: str | None, parts: list, open_round: list[int], open_square: list[int]) -> str | None:
    """One token into `parts` ([text, weight], None for a BREAK), weighing the enclosed parts at each closing
    bracket; the error message, if any."""
    if token.startswith("\\"):
        parts.append([token[1:], 1.0])
    elif token == "(":
        open_round.append(len(parts))
    elif token == "[":
        open_square.append(len(parts))
    elif weight is not None and open_round:
        try:
            factor = float(weight)
        except ValueError:
            return f"{token!r} is not a valid emphasis weight"
        _oracle_multiply_from(parts, open_round.pop(), factor)
    elif token == ")" and open_round:
        _oracle_multiply_from(parts, open_round.pop(), 1.1)
    elif token == "]" and open_square:
        _oracle_multiply_from(parts, open_square.pop(), 1 / 1.1)
    else:
        for index, piece in enumerate(_ORACLE_BREAK.split(token)):
            if index:
                parts.append(None)
            parts.append([piece, 1.0])
    return None


def _oracle_merge(parts: list) -> list[tuple[str, float, bool]]:
    merged: list[tuple[str, float, bool]] = []
    for part in parts:
        if part is None:
            merged.append(("", 1.0, True))
        elif not part[0]:
            continue
        elif merged and not merged[-1][2] and merged[-1][1] == part[1]:
            merged[-1] = (merged[-1][0] + part[0], part[1], False)
        else:
            merged.append((part[0], part[1], False))
    return merged or [("", 1.0, False)]


def oracle_parse_attention(text: str) -> list[tuple[str, float, bool]] | str:
    """(text, weight, is_break) per segment, or the error message."""
    parts: list = []
    open_round: list[int] = []
    open_square: list[int] = []
    for match in _ORACLE_TOKEN.finditer(text):
        error = _oracle_read_token(match.group(0), match.group("weight"), parts, open_round, open_square)
        if error is not None:
            return error
    for start in open_round:
        _oracle_multiply_from(parts, start, 1.1)
    for start in open_square:
        _oracle_multiply_from(parts, start, 1 / 1.1)
    return _oracle_merge(parts)


def oracle_split_subprompts(text: str) -> list[tuple[str, float]]:
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
            match = _ORACLE_WEIGHT_AFTER_COLON.match(text, index + 1)
            if match:
                parts.append((text[start:index].strip(), float(match.group(1))))
                index = start = match.end()
                continue
        index += 1
    parts.append((text[start:].strip(), 1.0))
    return [(part, weight) for part, weight in parts if part] or [("", 1.0)]


def oracle_extract_loras(text: str) -> tuple[str, list[tuple[str, float]]] | str:
    """(text without tags, [(name, weight)]) or the error message."""
    tags: list[tuple[str, float]] = []
    unknown: list[str] = []
    errors: list[str] = []

    def found(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind.lower() not in ("lora", "lyco"):
            unknown.append(match.group(0))
        elif not args[0].strip():
            errors.append(f"{match.group(0)} names no LoRA")
        elif len(args) > 2:
            errors.append(f"{match.group(0)}: separate")
        else:
            try:
                tags.append((args[0].strip(), float(args[1]) if len(args) == 2 else 1.0))
            except ValueError:
                errors.append(f"{match.group(0)}: the weight {args[1]!r} is not a number")
        return ""

    stripped = _ORACLE_TAG.sub(found, text)
    if errors:
        return errors[0]
    if unknown:
        return f"unsupported network tag {unknown[0]}"
    return stripped, tags


# -- behaviour as before -------------------------------------------------------------------------

ALPHABET = [
    "(", ")", "[", "]", "((", "[[", "\\", "\\(", "\\\\", ":", " ", "  ", "\n", "a", "bc", "é", "_", "0", ".", ",", "猫",
    "BREAK", " BREAK ", "BREAKx", "break", ":1.3)", ":0.5)", ": 2 )", ":-1)", ":0)", ":1e3)", ":1.2.3)", "1.2", "x:0.5 ",
    "<lora:x:0.5>", "<lora:z>", "<hypernet:y>", "<lyco:w:-1>", "<", ">", "<a:", "٣",
]  # fmt: skip


def segments_of(text: str) -> list[tuple[str, float, bool]] | str:
    try:
        return [(s.text, s.weight, s.is_break) for s in parse_attention(text)]
    except UserError as error:
        return str(error)


def loras_of(text: str) -> tuple[str, list[tuple[str, float]]] | str:
    try:
        stripped, tags = extract_loras(text)
    except UserError as error:
        return str(error)
    return stripped, [(t.name, t.weight) for t in tags]


def test_random_prompts_read_exactly_as_the_regex_parser_did() -> None:
    """Segments, weights (bit for bit: AUTOMATIC1111's order of multiplication), BREAKs, subprompts and
    tags of 3,000 random prompts over the syntax's alphabet equal the old parser's."""
    rng = random.Random(25)
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        assert segments_of(text) == oracle_parse_attention(text), text
        assert split_subprompts(text) == oracle_split_subprompts(text), text
        ours, theirs = loras_of(text), oracle_extract_loras(text)
        assert ours == theirs or (isinstance(ours, str) and isinstance(theirs, str) and ours.startswith(theirs)), text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a  BREAK  b", [("a", 1.0, False), ("", 1.0, True), ("b", 1.0, False)]),
        ("a BREAK BREAK b", [("a", 1.0, False), ("", 1.0, True), ("", 1.0, True), ("b", 1.0, False)]),
        ("(a BREAK b)", [("a", 1.1, False), ("", 1.0, True), ("b", 1.1, False)]),
        ("xBREAK BREAKy _BREAK BREAK_ BREAK1", [("xBREAK BREAKy _BREAK BREAK_ BREAK1", 1.0, False)]),  # not whole words
        ("a:BREAK", [("a:", 1.0, False), ("", 1.0, True)]),  # a colon is not a word character
        ("\\(BREAK\\)", [("(", 1.0, False), ("", 1.0, True), (")", 1.0, False)]),
        ("a \\( BREAK", [("a (", 1.0, False), ("", 1.0, True)]),  # blanks go only within the text next to BREAK
        ("(a:  -0.5  )", [("a", -0.5, False)]),
        ("(a:٣)", [("a", 3.0, False)]),  # a Unicode digit, as float() reads it
        ("(a:1.5", [("a:1.5", 1.1, False)]),  # no ')': the colon and number are text of an unclosed bracket
        ("[a:1.5)]", [("a:1.5)", 1 / 1.1, False)]),  # a weight closes only a round bracket
        ("(((a:1.3)))", [("a", 1.3 * 1.1 * 1.1, False)]),  # multiplied as the brackets close: 1.3, 1.1, 1.1
        ("[(a:1.3)](b[c]:1.3)", [("a", 1.3 * (1 / 1.1), False), ("b", 1.3, False), ("c", 1 / 1.1 * 1.3, False)]),
        ("(a[b)c]", [("a", 1.1, False), ("b", 1.1 * (1 / 1.1), False), ("c", 1 / 1.1, False)]),  # kinds close independently
    ],
)  # fmt: skip
def test_automatic1111_cases(text: str, expected: list[tuple[str, float, bool]]) -> None:
    assert segments_of(text) == expected == oracle_parse_attention(text)


def test_adversarial_prompts_at_the_length_cap() -> None:
    """The inputs that were quadratic (40,000 spaces took 27 s): each now one scan. No time is asserted;
    benchmarks/prompt_parse.py times 1 MB of each."""
    n = MAX_PROMPT_CHARS - 2
    assert parse_attention("a" + " " * n + "x") == [Segment("a" + " " * n + "x")]
    assert split_subprompts("a:" + "1" * n + "x") == [("a:" + "1" * n + "x", 1.0)]
    assert split_subprompts("a:" + "1" * n) == [("a", float("1" * n))]
    assert parse_attention("(a:" + "1" * n + "x") == [Segment("a:" + "1" * n + "x", 1.1)]
    assert extract_loras("<a:" * (n // 3)) == ("<a:" * (n // 3), [])
    assert parse_attention("BREAK " * (n // 6)).count(BREAK) == n // 6
    for nested in ("(a" * (n // 2), "[a" * (n // 2), "(" * n + "a", "([" * (n // 2) + "a"):
        with pytest.raises(UserError, match="nest too deeply|the emphasis on 'a' weighs"):
            parse_attention(nested)


# -- bounds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("(cat:" + "9" * 400 + ")", "weighs inf"),  # float('999...') overflows
        ("(" * 8000 + "cat" + ")" * 8000, "weighs inf"),  # 1.1 ** 8000
        ("(" * 49 + "cat", "weighs 106.7"),  # past the bound
        ("((cat:" + "9" * 400 + "):0)", "weighs nan"),  # inf * 0
        ("(cat:-101)", "weighs -101"),
    ],
)
def test_emphasis_weights_are_bounded(text: str, shown: str) -> None:
    with pytest.raises(UserError, match=f"the emphasis on 'cat' {shown}.*; a weight must be finite and within \\+-100"):
        parse_attention(text)
    with pytest.raises(UserError, match="^negative prompt: the emphasis on 'cat'"):
        check_prompt(text, "negative prompt")


def test_emphasis_weights_within_the_bound_are_kept() -> None:
    assert parse_attention("(" * 48 + "cat")[0].weight == pytest.approx(1.1**48)  # 97.0
    assert 0 < parse_attention("[" * 8000 + "cat")[0].weight < 1e-300  # 1.1 ** -8000 underflows: finite, like (cat:0)
    assert parse_attention("(cat:-100)")[0].weight == -100.0


def test_bracket_nesting_is_bounded_not_its_depth_alone() -> None:
    depth = 40
    pieces = MAX_EMPHASIS_NESTING // depth
    allowed = "([" * (depth // 2) + "(a)" * (pieces - 1)  # every piece inside 40 brackets, 41 for the (a)s
    parse_attention("([" * (depth // 2) + "a")
    with pytest.raises(UserError, match="emphasis brackets nest too deeply: its pieces of text sit inside over 100,000 brackets in all"):
        parse_attention(allowed + "(a)" * 10)


def test_prompt_length_and_text_are_checked_naming_the_prompt() -> None:
    check_prompt("a" * MAX_PROMPT_CHARS)
    with pytest.raises(UserError, match=f"^the prompt is 65,537 characters long; the limit is {MAX_PROMPT_CHARS:,}$"):
        check_prompt("a" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(UserError, match="^the negative prompt is 70,000 characters long"):
        check_prompt("a" * 70_000, "negative prompt")
    for surrogate, position in (("a cat \udcff", 6), ("\ud800", 0)):  # argv via surrogateescape; JSON's "\ud800"
        with pytest.raises(UserError, match=f"^the prompt holds an unpaired surrogate \\(U\\+D[C8]\\w\\w\\) at position {position}: "):
            check_prompt(surrogate)
    check_prompt("a cat 😺 \U0001f431")  # paired: fine


def test_chunks_are_bounded_before_and_after_tokenizing() -> None:
    check_prompt(" BREAK ".join(["a"] * MAX_PROMPT_CHUNKS))
    with pytest.raises(UserError, match=f"^prompt: {MAX_PROMPT_CHUNKS} BREAKs make more than the {MAX_PROMPT_CHUNKS} chunks"):
        check_prompt(" BREAK ".join(["a"] * (MAX_PROMPT_CHUNKS + 1)))
    with pytest.raises(UserError, match="^prompt: 10,000 BREAKs"):  # refused before any tokenizer runs
        check_prompt("BREAK " * 10_000)
    tokens = PromptTokens(lambda text: [7] * len(text.split()), SpecialTokens(1, 2, 2, None))
    words = " ".join(["w"] * (75 * MAX_PROMPT_CHUNKS))
    chunks, _ = build_chunks(parse_attention(words), tokens)
    assert len(chunks) == MAX_PROMPT_CHUNKS
    with pytest.raises(UserError, match=f"^the prompt 'w w w .*' is over {MAX_PROMPT_CHUNKS} chunks of 75 tokens \\(2,400 tokens\\)"):
        build_chunks(parse_attention(words + " w"), tokens)


def test_lora_tag_weights_must_be_finite() -> None:
    for weight in ("inf", "nan", "1e400"):
        with pytest.raises(UserError, match=f"<lora:x:{weight}>: the weight '{weight}' must be a finite number"):
            extract_loras(f"a <lora:x:{weight}>")


# -- every way in ------------------------------------------------------------------------------------


@pytest.fixture
def base(tiny_model, tmp_path):
    return [
        "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu", "--seed", "5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a" * 70_000], "error: --prompt is 70,000 characters long; the limit is 65,536"),
        (["--prompt", "x", "--negative-prompt", "b" * 70_000], "error: --negative-prompt is 70,000 characters long"),
        (["--prompt", "a cat \udcff"], "error: --prompt holds an unpaired surrogate (U+DCFF) at position 6"),
        (["--prompt", "(" * 8000 + "cat"], "error: --prompt is refused: the emphasis on 'cat' weighs inf"),
        (["--prompt", "x", "--negative-prompt", "(cat:1000000000)"], "error: --negative-prompt is refused: the emphasis on 'cat' weighs"),
        (["--prompt", "a BREAK " * 40], "error: --prompt is refused: 40 BREAKs make more than the 32 chunks"),
    ],
)
def test_cli_refuses_in_one_line_before_loading(capsys, base, tmp_path, extra, message) -> None:
    code, _, err = run_cli(capsys, "txt2img", *base, *extra)
    assert code == 1 and err.count("\n") == 1 and err.startswith(message), err[:300]
    assert not (tmp_path / "out").exists()


def test_prompt_file_and_job_file_lines_are_checked(tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "(" * 60 + "dog\n")
    job = Job(prompt_file=prompts, output=Job().output.__class__(tmp_path / "out"))
    job.validate()
    with pytest.raises(UserError, match="^prompt: the emphasis on 'dog' weighs 304"):
        job.check_batches(job.batches())
    from optimized_sd.batch.jobs import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat"}) + "\n" + '{"prompt": "a \\ud800 cat"}\n')
    with pytest.raises(UserError, match=r"jobs.jsonl line 2: field 'prompt' holds an unpaired surrogate \(U\+D800\) at position 2"):
        read_jobs(jobs, Job(prompts=("x",)))


def test_library_request_and_server_spec_are_checked() -> None:
    with pytest.raises(UserError, match="^the negative prompt is 70,000 characters long"):
        check_request(GenerationRequest(["a cat"], negative_prompt="n" * 70_000, height=64, width=64), TINY)
    from optimized_sd.server.backend import FieldError, GenerationSpec, api_error, check_spec

    for field, change in (("prompt", {"prompt": "\ud800"}), ("negative_prompt", {"negative_prompt": "x" * 70_000})):
        with pytest.raises(FieldError) as refused:
            check_spec(GenerationSpec(**{"prompt": "x", "width": 64, "height": 64, **change}))
        assert api_error(refused.value).field == field and "\n" not in str(refused.value)  # the API's name for it


# -- mean restoration ----------------------------------------------------------------------------------


def zero_mean_encoder(ids: torch.Tensor, fixes) -> tuple[torch.Tensor, None]:
    """A text tower whose every output row sums to exactly 0 (small integers: every partial sum exact), as
    a final norm with weight 1 and bias 0 would give were it exact: a chunk's mean is exactly 0."""
    value = (ids % 3 - 1).float()[..., None]  # (n, 77, 1) in {-1, 0, 1}
    return torch.cat([value, -value, 2 * value, -2 * value], dim=-1), None  # (n, 77, 4)


def test_mean_restoration_never_divides_zero_by_zero() -> None:
    tokens = PromptTokens(lambda text: [ord(c) for c in text if not c.isspace()], SpecialTokens(1, 2, 2, None))
    encoder = PromptEncoder(tokens, zero_mean_encoder)
    for text in ("", "猫が好き"):  # unweighted: the restoration is the identity, and is skipped
        z, _ = encoder(text)
        chunks, _ = build_chunks(parse_attention(text), tokens)
        assert torch.equal(z, zero_mean_encoder(torch.tensor([chunks[0].ids]), [])[0])
    z, _ = encoder("(猫)が好き")  # weighted, and the mean before is 0: the ratio would be 0 (or 0 / 0)
    chunks, _ = build_chunks(parse_attention("(猫)が好き"), tokens)
    raw = zero_mean_encoder(torch.tensor([chunks[0].ids]), [])[0]
    assert torch.equal(z, raw * torch.tensor(chunks[0].weights)[None, :, None])
    assert torch.isfinite(encode_chunks(chunks, zero_mean_encoder)[0]).all()


def test_norm_with_unit_weight_and_zero_bias_gives_finite_embeddings(tmp_path) -> None:
    """The tiny CLIP as built (final norm weight 1, bias 0: each row's mean is ~0): the empty prompt and
    CJK prompts, plain and weighted, encode to finite numbers."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from optimized_sd.models.text_encoder import clip_config, write_byte_tokenizer

    torch.manual_seed(3)
    model = CLIPTextModel(clip_config(TINY.text)).eval()
    norm = getattr(model, "text_model", model).final_layer_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    tokenizer = CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp_path, TINY.text.vocab_size)))
    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id, None)
    tokens = PromptTokens(lambda text: tokenizer(text, add_special_tokens=False).input_ids, special)

    @torch.no_grad()
    def encode(ids, fixes):
        return model(input_ids=ids).last_hidden_state, None

    encoder = PromptEncoder(tokens, encode)
    for text in ("", "猫が好き", "(猫:1.4)が[好き]", "猫 BREAK 犬"):
        assert torch.isfinite(encoder(text)[0]).all(), text
    assert not math.isnan(float(encoder("")[0].mean()))
