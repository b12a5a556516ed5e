"""Where images go and what they carry: optimizedSD's folder and file names, AUTOMATIC1111-style
`parameters` text, and writes that never replace an existing file."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from optimized_sd.errors import UserError

MAX_PATH = 150
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


@dataclass(frozen=True)
class ImageParameters:
    """What made an image, written as AUTOMATIC1111's `parameters` text so SD metadata readers parse it."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str
    model_name: str
    strength: float | None = None
    extra: tuple[tuple[str, str], ...] = ()  # further `Name: value` fields (Schedule type, Lora hashes, TI hashes)

    def text(self) -> str:
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.cfg_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model hash: {self.model_hash}",
            f"Model: {self.model_name}",
        ]
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        fields += [f"{name}: {value}" for name, value in self.extra]
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def prompt_folder(outdir: Path, prompt: str) -> Path:
    """optimizedSD's `outdir/<prompt with spaces and colons as _>`, made safe for every file system,
    the whole path capped at 150 characters (long prompts broke Windows paths: optimizedSD #2, #18)."""
    name = "_".join(re.split(r":| ", prompt.strip()))
    name = re.sub(r'[<>"/\\|?*\x00-\x1f]', "", name).strip(". ") or "prompt"
    budget = max(1, MAX_PATH - len(str(outdir)) - 1)
    return outdir / name[:budget]


def ensure_writable(folder: Path) -> None:
    """Fail before any work if the folder cannot be made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to output folder {folder}: {error.strerror or error}") from None


def encode(image: Image.Image, fmt: str, parameters: str) -> bytes:
    """PNG with a `parameters` tEXt chunk, or JPEG with the text as EXIF UserComment (UNICODE)."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt == "jpg":
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    else:
        raise UserError(f"unknown image format {fmt!r}; use png or jpg")
    return buffer.getvalue()


def write_new(folder: Path, stem: str, fmt: str, data: bytes, start: int) -> Path:
    """Write `data` as `<stem>_<count:05>.<fmt>` at the first free count from `start`; an existing
    file is never opened for writing (O_EXCL)."""
    count = start
    while True:
        path = folder / f"{stem}_{count:05}.{fmt}"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            count += 1
            continue
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return path


def save_image(image: Image.Image, folder: Path, seed: int, fmt: str, parameters: ImageParameters) -> Path:
    """`seed_<seed>_<count>.<fmt>`, count = files already in the folder, as optimizedSD."""
    start = sum(1 for _ in folder.iterdir())
    return write_new(folder, f"seed_{seed}", fmt, encode(image, fmt, parameters.text()), start)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images in rows of `columns` with a 2-pixel gap, as torchvision's make_grid lays them out."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    pad = 2
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image, (pad + column * (width + pad), pad + row * (height + pad)))
    return grid


def read_parameters(path: Path) -> str | None:
    """The parameters text of a PNG or JPEG written here (for tests and `inspect`)."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return image.info.get("parameters")
        comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
            return comment[8:].decode("utf-16-be")
        return None
