"""Prompt encoding as AUTOMATIC1111 does it, for any CLIP-like text tower.

A prompt becomes chunks of 75 tokens, each wrapped as [start] + tokens + [end] + [pad...] to 77
(a chunk ends early at the last comma within its last 20 tokens, and at BREAK). Each chunk is
encoded, its output rows are multiplied by the tokens' emphasis weights and the chunk's mean is
then restored (z * (mean before / mean after); skipped where it would divide by 0 or scale by 0 or a
non-finite number); chunks are concatenated along the sequence. A prompt may need at most
MAX_PROMPT_CHUNKS chunks.
Textual-inversion vectors take one token position each and are spliced in by the text tower.

The tower is reached through two callables, so SD 1.x CLIP, OpenCLIP (pad id 0) and SDXL's two
towers share this code: `tokenize(text) -> ids` without special tokens, and
`encode(ids (n, 77), fixes) -> ((n, 77, C), pooled (n, P) or None)`. A prompt's pooled vector (SDXL)
is its first chunk's, as AUTOMATIC1111 takes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from optimized_sd.config import MAX_PROMPT_CHUNKS
from optimized_sd.errors import UserError

from .syntax import Segment, parse_attention, subprompt_mix

CHUNK_TOKENS = 75  # tokens of text per chunk; with start and end, 77
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default "comma_padding_backtrack"
EMBEDDING_PLACEHOLDER_ID = 0  # the id under a spliced vector (AUTOMATIC1111's); its embedding is replaced

Fix = tuple[int, Tensor]  # (position in the 77-token chunk, (vectors, C_embed) rows to splice there)
ChunkEncoder = Callable[[Tensor, Sequence[Sequence[Fix]]], tuple[Tensor, Tensor | None]]
Encoded = tuple[Tensor, Tensor | None]  # (1, 77 * chunks, C) float32, pooled (1, P) float32 or None


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a tower wraps chunks with; OpenCLIP pads with 0, CLIP with the end token."""

    start: int
    end: int
    pad: int
    comma: int | None


@dataclass
class Chunk:
    """77 token ids, their emphasis weights, and where embedding vectors go."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)


@dataclass(frozen=True)
class PromptTokens:
    """A tower's tokenizer seen by the encoder: text -> ids (no start/end) and the special ids."""

    tokenize: Callable[[str], list[int]]
    special: SpecialTokens


def _items(segments: Sequence[Segment], tokens: PromptTokens, embeddings: Mapping[str, Tensor], used: list[str]):
    """Yield ('break', None, 1) | ('token', id, weight) | ('embedding', vectors, weight) in order.
    An embedding name counts only as a whole word (case-insensitive, as CLIP lowercases)."""
    pattern = None
    if embeddings:
        names = sorted(embeddings, key=len, reverse=True)
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE)
        by_lower = {name.lower(): name for name in names}
    for segment in segments:
        if segment.is_break:
            yield "break", None, 1.0
            continue
        pieces = pattern.split(segment.text) if pattern is not None else [segment.text]
        for index, piece in enumerate(pieces):
            if index % 2:  # re.split puts the captured names at odd indices
                name = by_lower[piece.lower()]
                if name not in used:
                    used.append(name)
                yield "embedding", embeddings[name], segment.weight
            else:
                for token in tokens.tokenize(piece):
                    yield "token", token, segment.weight


def build_chunks(
    segments: Sequence[Segment], tokens: PromptTokens, embeddings: Mapping[str, Tensor] | None = None
) -> tuple[list[Chunk], list[str]]:
    """AUTOMATIC1111's `tokenize_line`: the chunks of one prompt and the embedding names it used."""
    special = tokens.special
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    used: list[str] = []

    def close() -> None:
        nonlocal chunk, last_comma
        if len(chunks) == MAX_PROMPT_CHUNKS:
            raise too_many_chunks(segments)
        padding = CHUNK_TOKENS - len(chunk.ids)
        # (77,): start, text, end, then padding (the end token again for CLIP, 0 for OpenCLIP)
        chunk.ids = [special.start] + chunk.ids + [special.end] + [special.pad] * padding
        chunk.weights = [1.0] + chunk.weights + [1.0] + [1.0] * padding
        chunk.fixes = [(offset + 1, vectors) for offset, vectors in chunk.fixes]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for kind, value, weight in _items(segments, tokens, embeddings or {}, used):
        if kind == "break":
            close()
            continue
        if kind == "token" and value == special.comma:
            last_comma = len(chunk.ids)
        elif len(chunk.ids) == CHUNK_TOKENS and last_comma != -1 and len(chunk.ids) - last_comma <= COMMA_BACKTRACK:
            # a full chunk with a recent comma: what follows the comma moves to the next chunk
            cut = last_comma + 1
            moved_ids, moved_weights = chunk.ids[cut:], chunk.weights[cut:]
            moved_fixes = [(offset - cut, v) for offset, v in chunk.fixes if offset >= cut]
            chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
            chunk.fixes = [(offset, v) for offset, v in chunk.fixes if offset < cut]
            close()
            chunk.ids, chunk.weights, chunk.fixes = moved_ids, moved_weights, moved_fixes
        if len(chunk.ids) == CHUNK_TOKENS:
            close()
        if kind == "token":
            chunk.ids.append(value)
            chunk.weights.append(weight)
            continue
        count = int(value.shape[0])
        if len(chunk.ids) + count > CHUNK_TOKENS:
            close()
        chunk.fixes.append((len(chunk.ids), value))
        chunk.ids += [EMBEDDING_PLACEHOLDER_ID] * count
        chunk.weights += [weight] * count
    if chunk.ids or not chunks:
        close()
    return chunks, used


def too_many_chunks(segments: Sequence[Segment]) -> UserError:
    """The one-line refusal of a prompt past MAX_PROMPT_CHUNKS chunks, naming it by its start."""
    text = "".join(segment.text if not segment.is_break else " BREAK " for segment in segments[:40])
    shown = text if len(text) <= 40 else text[:37] + "..."
    limit = MAX_PROMPT_CHUNKS * CHUNK_TOKENS
    return UserError(f"the prompt {shown!r} is over {MAX_PROMPT_CHUNKS} chunks of {CHUNK_TOKENS} tokens ({limit:,} tokens); shorten it")


def encode_chunks(chunks: Sequence[Chunk], encode: ChunkEncoder) -> Encoded:
    """(1, 77 * len(chunks), C) float32: each chunk encoded, weighted and its mean restored; and the
    first chunk's pooled vector (unweighted, as AUTOMATIC1111).

    The restoration is skipped in a chunk whose weights are all 1 (it is the identity there, but
    0 / 0 where the chunk's mean is exactly 0: a text tower whose final norm has weight 1 and bias 0, an
    fp16 tower, a prompt of unknown tokens) and where the ratio of the means is 0 or not finite."""
    ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long)  # (n, 77)
    z, pooled = encode(ids, [chunk.fixes for chunk in chunks])
    z = z.float()  # (n, 77, C)
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32, device=z.device)[..., None]  # (n, 77, 1)
    original_mean = z.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1): per chunk, as AUTOMATIC1111 encodes chunk by chunk
    weighted = z * weights
    ratio = original_mean / weighted.mean(dim=(1, 2), keepdim=True)
    restore = (weights != 1).any(dim=1, keepdim=True) & torch.isfinite(ratio) & (ratio != 0)
    z = torch.where(restore, weighted * ratio, weighted)
    return z.reshape(1, -1, z.shape[-1]), None if pooled is None else pooled[:1].float()


def is_plain(text: str, segments: Sequence[Segment]) -> bool:
    """No emphasis markup: one segment of weight 1 whose text is the prompt itself (escapes would change it)."""
    return len(segments) == 1 and segments[0].weight == 1 and not segments[0].is_break and segments[0].text == text


def whole_sequence(segments: Sequence[Segment], tokenize: Callable[[str], list[int]], end: int, pad: int, length: int) -> Chunk:
    """A prompt as one sequence of `length` ids for a tower that reads it whole (T5), as Forge's T5 engine builds
    it: each segment's tokens with its weight (BREAK is ignored: there are no chunks to start), cut to `length` - 1,
    then the end token and padding, weighted 1 (padded with `pad`, as the plain prompt is, where Forge repeats
    the end token). `encode_chunks` then weights the states and restores their mean (Forge's "Original" emphasis)."""
    chunk = Chunk()
    for segment in segments:
        ids = tokenize(segment.text) if segment.text else []
        chunk.ids += ids
        chunk.weights += [segment.weight] * len(ids)
    del chunk.ids[length - 1 :], chunk.weights[length - 1 :]
    padding = length - 1 - len(chunk.ids)
    chunk.ids += [end] + [pad] * padding
    chunk.weights += [1.0] * (1 + padding)
    return chunk


@contextmanager
def spliced(token_embedding: nn.Module, fixes: Sequence[Sequence[Fix]]) -> Iterator[None]:
    """Within the block, the token embedding's output (n, 77, C) has each fix's vectors in place of
    the placeholder ids (how a tower takes textual-inversion vectors without a new token)."""

    def replace(module: nn.Module, inputs: tuple, embeds: Tensor) -> Tensor:
        if not any(fixes):
            return embeds
        embeds = embeds.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, vectors in row_fixes:
                embeds[row, offset : offset + vectors.shape[0]] = vectors.to(embeds)
        return embeds

    handle = token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def pad_to_chunks(z: Tensor, chunks: int, empty: Callable[[], Tensor]) -> Tensor:
    """Append encodings of the empty prompt (`empty()`: (1, 77, C), asked for only when padding is needed:
    it may run a whole text tower) until z has `chunks` chunks."""
    have = z.shape[1] // (CHUNK_TOKENS + 2)
    if have >= chunks:
        return z
    return torch.cat([z, empty().to(z).expand(z.shape[0], -1, -1).repeat(1, chunks - have, 1)], dim=1)


@dataclass
class PromptEncoder:
    """Encodes prompts for one text tower: optimizedSD subprompts, then AUTOMATIC1111 emphasis and chunks."""

    tokens: PromptTokens
    encode: ChunkEncoder
    embeddings: Mapping[str, Tensor] = field(default_factory=dict)
    _empty: Encoded | None = field(default=None, repr=False)

    def empty(self) -> Tensor:
        """(1, 77, C): the empty prompt, which pads the shorter of prompt and negative prompt."""
        return self.encode_text("")[0]

    def encode_text(self, text: str, used: list[str] | None = None) -> Encoded:
        """One prompt without subprompt weights -> ((1, 77 * chunks, C), pooled) float32. The empty prompt
        (padding, and the usual negative prompt) is encoded once per encoder."""
        if not text and self._empty is not None:
            return self._empty
        chunks, names = build_chunks(parse_attention(text), self.tokens, self.embeddings)
        if used is not None:
            used.extend(name for name in names if name not in used)
        encoded = encode_chunks(chunks, self.encode)
        if not text:
            self._empty = encoded
        return encoded

    def __call__(self, prompt: str, used: list[str] | None = None) -> Encoded:
        """A prompt (LoRA tags already removed) -> ((1, 77 * chunks, C), pooled or None) float32.

        Weighted subprompts are encoded apart, padded to the same chunk count with the empty prompt
        and mixed with their weights normalised to sum 1 (optimizedSD); pooled vectors alike."""
        parts, weights = subprompt_mix(prompt)
        if len(parts) == 1:
            return self.encode_text(parts[0], used)
        encoded = [self.encode_text(text, used) for text in parts]
        chunks = max(z.shape[1] for z, _ in encoded) // (CHUNK_TOKENS + 2)
        z = sum(pad_to_chunks(z, chunks, self.empty) * weight for (z, _), weight in zip(encoded, weights))
        pooled = None if encoded[0][1] is None else sum(p * weight for (_, p), weight in zip(encoded, weights))
        return z, pooled
