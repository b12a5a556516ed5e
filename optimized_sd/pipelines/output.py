"""Where images go and what they carry: optimizedSD's folder and file names, AUTOMATIC1111-style
`parameters` text, and writes that never replace an existing file."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from optimized_sd.errors import FieldError, UserError

log = logging.getLogger("optimized_sd")

MAX_PATH = 150
MAX_NAME_BYTES = 255  # a file or folder name on ext4, NTFS (as UTF-16 units), APFS
JPEG_EXIF_LIMIT = 65_533  # an APP1 segment holds 65,535 bytes less its 2-byte length (PIL's MAX_BYTES_IN_MARKER)
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
    vae_hash: str | None = None  # `--vae FILE`'s short hash (AUTOMATIC1111's "VAE hash")
    vae_name: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # further `Name: value` fields (Schedule type, Lora hashes, TI hashes)

    def text(self) -> str:
        """Prompt line, `Negative prompt:` line, then the `Key: value, ...` line. Newlines in the prompts
        become spaces (CLIP reads them as spaces anyway), so no prompt can forge a line a reader would
        take for ours; a value holding ',', ':' or a newline is JSON-quoted, as AUTOMATIC1111 does."""
        fields = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": f"{self.cfg_scale:g}",
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
        }
        if self.strength is not None:
            fields["Denoising strength"] = f"{self.strength:g}"
        if self.vae_hash is not None:
            fields["VAE hash"] = self.vae_hash
        if self.vae_name is not None:  # a file with its hash, or "taesd" (a tiny decoder, as AUTOMATIC1111's VAE type)
            fields["VAE"] = self.vae_name
        fields = with_extras(fields, self.extra)
        lines = [one_line(self.prompt)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {one_line(self.negative_prompt)}")
        lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
        return "\n".join(lines)


# Extra fields AUTOMATIC1111 and Forge write next to a standard one, not at the end (Forge's Flux order:
# Steps, Sampler, Schedule type, CFG scale, Distilled CFG Scale, Seed, ...).
PLACED_AFTER = {"Schedule type": "Sampler", "Distilled CFG Scale": "CFG scale"}


def with_extras(fields: dict[str, object], extra: tuple[tuple[str, str], ...]) -> dict[str, object]:
    """`fields` with the extra pairs added: those of PLACED_AFTER beside their anchor, the rest at the end."""
    placed = {name: value for name, value in extra if name in PLACED_AFTER}
    ordered: dict[str, object] = {}
    for key, value in fields.items():
        ordered[key] = value
        ordered.update({name: placed[name] for name, anchor in PLACED_AFTER.items() if anchor == key and name in placed})
    ordered.update((name, value) for name, value in extra if name not in placed)
    return ordered


def one_line(text: str) -> str:
    """Every line break (any of those `str.splitlines` knows) as a space."""
    return " ".join(text.splitlines())


def quote(value: object) -> str:
    """AUTOMATIC1111's infotext rule: a value holding ',', ':' or a newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def prompt_folder(outdir: Path, prompt: str) -> Path:
    """optimizedSD's `outdir/<prompt with spaces and colons as _>`, made safe for every file system:
    the whole path capped at 150 characters (long prompts broke Windows paths: optimizedSD #2, #18)
    and the folder name at 255 bytes of UTF-8 (the file systems' limit counts bytes, and a CJK or
    emoji character takes 3-4), cut between characters."""
    name = "_".join(re.split(r":| ", " ".join(prompt.split())))
    name = re.sub(r'[<>"/\\|?*\x00-\x1f\x7f]', "", name).strip(". ") or "prompt"
    budget = max(1, MAX_PATH - len(str(outdir)) - 1)
    return outdir / (cut_to_bytes(name[:budget], MAX_NAME_BYTES).rstrip(". ") or "prompt")


def cut_to_bytes(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 form fits in `limit` bytes (no character split)."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def check_output_folder(folder: Path) -> None:
    """Fail before any work if `folder` could not be made or written, creating nothing: every part of
    the path that exists must be a folder, and the deepest existing one writable. (No probe file: a
    probe could follow a planted link; `os.access` asks the kernel instead.)"""
    path = Path(os.path.abspath(folder))
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise UserError(f"cannot write to output folder {folder}: {part} exists and is not a folder")
            if not os.access(part, os.W_OK | os.X_OK):
                raise UserError(f"cannot write to output folder {folder}: {part} is not writable")
            return


def make_folder(folder: Path) -> None:
    """Create an output folder at the first write (so a failed run leaves no empty folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {folder}: {error.strerror or error}") from None


def encode(image: Image.Image, fmt: str, parameters: str) -> bytes:
    """PNG with a `parameters` text chunk, or JPEG with the text as EXIF UserComment (UNICODE). Text
    that does not fit a JPEG's EXIF segment (64 KB, so prompts over ~32k characters) raises
    `MetadataTooLong`; the caller writes it beside the image instead."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt == "jpg":
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        exif_bytes = exif.tobytes() if parameters else b""
        if len(exif_bytes) > JPEG_EXIF_LIMIT:
            raise MetadataTooLong(len(exif_bytes))
        image.save(buffer, format="JPEG", quality=95, exif=exif_bytes)
    else:
        raise UserError(f"unknown image format {fmt!r}; use png or jpg")
    return buffer.getvalue()


class MetadataTooLong(ValueError):
    """The parameters text does not fit the image format's metadata."""


def write_exclusive(path: Path, data: bytes) -> None:
    """Write `data` under `path` whole or not at all, never replacing a file already there.

    The bytes go to a hidden temp file in the same folder, are flushed to disk, then hard-linked to
    the final name (`link` fails when the name exists: the O_EXCL guarantee) and the temp name
    removed. A kill or a full disk leaves at most a `.tmp-*` file, never a short file under a final
    name; a failed write removes its temp file. Raises FileExistsError when `path` exists."""
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError:
            # A file system without hard links: reserve the name with O_EXCL, then move the whole
            # file over that reservation (the only window with a 0-byte file is the rename's).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def write_new(folder: Path, stem: str, fmt: str, data: bytes, start: int) -> Path:
    """Write `data` as `<stem>_<count:05>.<fmt>` at the first free count from `start`; an existing
    file is never replaced (see `write_exclusive`). A failed write is a UserError naming the file."""
    make_folder(folder)
    count = start
    while True:
        path = folder / f"{stem}_{count:05}.{fmt}"
        try:
            write_exclusive(path, data)
            return path
        except FileExistsError:
            count += 1
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def write_report(path: Path, data: bytes) -> None:
    """The JSON report: written whole, and never over an existing file."""
    try:
        write_exclusive(path, data)
    except FileExistsError:
        raise FieldError.about("report_json", f"{path} exists; it is never overwritten") from None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def check_report_path(path: Path) -> None:
    """Before any work: the report's name must be free and its folder writable."""
    if path.exists() or path.is_symlink():
        raise FieldError.about("report_json", f"{path} exists; it is never overwritten")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise FieldError.about("report_json", f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FieldError.about("report_json", f"{path}: the folder {parent} is not writable")


def save_image(image: Image.Image, folder: Path, seed: int, fmt: str, parameters: ImageParameters) -> list[Path]:
    """`seed_<seed>_<count>.<fmt>`, count = files already in the folder, as optimizedSD. Parameters
    too long for the format's metadata go to `<same name>.txt` beside it (a warning says so).
    Returns the files written (the image first)."""
    make_folder(folder)
    return save_encoded(image, folder, f"seed_{seed}", fmt, parameters.text(), next_count(folder))


def next_count(folder: Path) -> int:
    """optimizedSD's count: the files already in the folder (hidden ones, such as a killed write's
    `.tmp-*` leftover, do not count)."""
    return sum(1 for entry in folder.iterdir() if not entry.name.startswith("."))


def save_image_bytes(data: bytes, folder: Path, seed: int, fmt: str) -> Path:
    """An image already encoded with its metadata (a batch worker's) under the next `seed_<seed>_<count>`."""
    make_folder(folder)
    return write_new(folder, f"seed_{seed}", fmt, data, next_count(folder))


def save_encoded(image: Image.Image, folder: Path, stem: str, fmt: str, text: str, start: int) -> list[Path]:
    """Encode with the metadata, or without it plus a side `.txt` file when it does not fit."""
    try:
        return [write_new(folder, stem, fmt, encode(image, fmt, text), start)]
    except MetadataTooLong as too_long:
        path = write_new(folder, stem, fmt, encode(image, fmt, ""), start)
        side = path.with_suffix(".txt")
        try:
            write_exclusive(side, text.encode("utf-8"))
        except OSError as error:
            raise UserError(f"cannot write {side}: {error.strerror or error}") from None
        log.warning(
            "the parameters of %s need %d bytes of EXIF (a JPEG holds %d); they are in %s",
            path,
            too_long.args[0],
            JPEG_EXIF_LIMIT,
            side.name,
        )
        return [path, side]


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
