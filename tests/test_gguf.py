"""GGUF: our reader and dequantisation against the `gguf` package (llama.cpp's own Python writer, quantizer
and reference dequantizer), ComfyUI-GGUF's reshaped weights, every malformed header, the op layer holding
GGUF bytes, and `inspect`."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_runs import run_cli as cli
from gguf import GGMLQuantizationType as Q

import optimized_sd.weights.gguf as gguf_module
from optimized_sd.errors import CheckpointError
from optimized_sd.ggml_quants import GGML_TYPES, dequantize
from optimized_sd.models.ops import Conv2d, Linear
from optimized_sd.weights.ckpt import load_ckpt
from optimized_sd.weights.gguf import GgufSource, read_gguf
from optimized_sd.weights.inspect import describe_checkpoint, format_info

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants.quantize writes these
# Byte offsets of each block type's fp16 scale fields (GGML's block structs), made finite in random blocks.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes) of random blocks of type `name` holding a (rows, cols) tensor, every bit pattern but with
    finite fp16 scales (the K-quants cannot be quantized by the package, so every format is tested this way)."""
    block, size = gguf.GGML_QUANT_SIZES[Q[name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for start in F16_FIELDS[name]:
        scales = (rng.standard_normal(len(raw)) * rng.choice([1e-4, 1e-2, 1.0, 100.0], len(raw))).astype(np.float16)
        raw[:, start : start + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def quantized(name: str, values: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(values, Q[name])


def same_bits(ours: torch.Tensor, reference: np.ndarray) -> bool:
    return ours.dtype == torch.float32 and np.array_equal(ours.numpy().view(np.uint32), np.asarray(reference, np.float32).view(np.uint32))


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str = "sdxl", **metadata: object) -> Path:
    """A GGUF file by the package's writer: name -> (array, type name); a uint8 array is the type's raw bytes."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key.replace("__", "."), value)
        else:
            writer.add_string(key.replace("__", "."), str(value))
    for name, (array, qtype) in tensors.items():
        raw = array if array.dtype == np.uint8 else quantized(qtype, array)
        writer.add_tensor(name, raw, raw_dtype=Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- dequantisation: bit-exact with gguf.quants.dequantize ---------------------------------------------


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_random_blocks_dequantize_bit_exactly(name: str) -> None:
    raw = random_blocks(name, 6, 512)
    ours = dequantize(torch.from_numpy(raw).reshape(-1), Q[name].value, (6, 512))
    assert same_bits(ours, gguf.quants.dequantize(raw, Q[name]))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_weights_dequantize_bit_exactly(name: str) -> None:
    values = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32) * 3
    values[0, :32] = 0  # an all-zero block: its scale is 0
    raw = quantized(name, values).view(np.uint8)
    ours = dequantize(torch.from_numpy(raw.copy()).reshape(-1), Q[name].value, (16, 256))
    assert same_bits(ours, gguf.quants.dequantize(raw, Q[name]).reshape(16, 256))
    if name in BLOCK_TYPES:  # the round trip is close (4 bits: within a step), so the layout reads as the writer meant
        assert float((ours - torch.from_numpy(values)).abs().max()) <= np.abs(values).max() / 8


def test_dequantize_casts_after_computing_in_float32() -> None:
    raw = torch.from_numpy(random_blocks("Q4_K", 2, 256)).reshape(-1)
    exact = dequantize(raw, Q.Q4_K.value, (2, 256))
    assert torch.equal(dequantize(raw, Q.Q4_K.value, (2, 256), torch.float16), exact.half())
    assert torch.equal(dequantize(raw, Q.Q4_K.value, (2, 256), torch.bfloat16), exact.bfloat16())


def test_dequantize_refuses_bytes_that_do_not_fit() -> None:
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(raw, Q.Q8_0.value, (2, 32))
    with pytest.raises(ValueError, match=r"GGML type 20 \(IQ4_NL\) is not supported"):
        dequantize(raw, 20, (32,))


# --- the reader ------------------------------------------------------------------------------------------


def test_every_type_reads_back_bit_exactly_from_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for name in BLOCK_TYPES:
        tensors[f"blocks.{name}.weight"] = (random_blocks(name, 3, 512), name)
    for name in ("F32", "F16", "BF16"):
        tensors[f"float.{name}.weight"] = (rng.standard_normal((5, 6)).astype(np.float32), name)
    path = write_gguf(tmp_path / "all.gguf", tensors)
    reference = gguf.GGUFReader(str(path))
    file = read_gguf(path)
    assert file.version == 3 and file.alignment == 32 and file.architecture == "sdxl"
    assert list(file.tensors) == list(tensors)
    state = file.state_dict()
    for record in reference.tensors:
        info = file.tensors[record.name]
        assert info.type_name == record.tensor_type.name and info.nbytes == record.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(record.shape))
        assert info.offset % 32 == 0
        assert torch.equal(info.raw, torch.from_numpy(np.array(record.data).view(np.uint8).reshape(-1)))
        assert same_bits(state[record.name], gguf.quants.dequantize(record.data, record.tensor_type))
    stored = file.state_dict(dequantize=False)
    assert stored["blocks.Q4_K.weight"].dtype == torch.uint8 and stored["float.F16.weight"].dtype == torch.float16
    assert stored["float.F16.weight"].shape == (5, 6)
    file.close()
    with pytest.raises(CheckpointError, match="closed"):
        _ = file.tensors["float.F32.weight"].raw


def test_metadata_of_every_value_type(tmp_path: Path) -> None:
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for add, key, value in [("uint8", "u8", 200), ("int8", "i8", -100), ("uint16", "u16", 60000), ("int16", "i16", -30000),
                            ("uint32", "u32", 4_000_000_000), ("int32", "i32", -2_000_000_000), ("float32", "f32", 0.5),
                            ("bool", "b", True), ("string", "s", "héllo"), ("uint64", "u64", 2**63), ("int64", "i64", -(2**62)),
                            ("float64", "f64", 0.1)]:
        getattr(writer, f"add_{add}")(key, value)
    for key, value in [("ints", [1, 2, 3]), ("strings", ["a", "bc"]), ("floats", [0.5, 1.5]), ("bools", [True, False]),
                       ("nested", [[1, 2], [3]])]:
        writer.add_array(key, value)
    writer.add_custom_alignment(64)
    writer.add_tensor("t", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = read_gguf(path)
    assert file.metadata == {
        "general.architecture": "flux", "u8": 200, "i8": -100, "u16": 60000, "i16": -30000, "u32": 4_000_000_000,
        "i32": -2_000_000_000, "f32": 0.5, "b": True, "s": "héllo", "u64": 2**63, "i64": -(2**62), "f64": 0.1,
        "ints": [1, 2, 3], "strings": ["a", "bc"], "floats": [0.5, 1.5], "bools": [True, False], "nested": [[1, 2], [3]],
        "general.alignment": 64,
    }
    assert file.alignment == 64 and file.data_start % 64 == 0 and file.tensors["t"].offset % 64 == 0
    assert torch.equal(file.state_dict()["t"], torch.arange(8, dtype=torch.float32))


def test_comfyui_reshaped_weights_read_with_their_real_shape(tmp_path: Path) -> None:
    """ComfyUI-GGUF stores SD 1.x/SDXL convs and narrow weights as (n/256, 256) with the real shape in metadata."""
    rng = np.random.default_rng(3)
    conv = rng.standard_normal((320, 4, 3, 3)).astype(np.float32)  # 11520 values = 45 x 256
    narrow = rng.standard_normal((640, 320)).astype(np.float32)  # 320 is no multiple of 256: Q4_K needs that
    tensors = {"input_blocks.0.0.weight": (conv.reshape(-1, 256), "F16"),
               "input_blocks.4.0.skip_connection.weight": (random_blocks("Q4_K", 800, 256), "Q4_K")}
    path = write_gguf(tmp_path / "sdxl-Q4_K.gguf", tensors, **{
        "comfy__gguf__orig_shape__input_blocks.0.0.weight": list(conv.shape),
        "comfy__gguf__orig_shape__input_blocks.4.0.skip_connection.weight": list(narrow.shape),
    })
    file = read_gguf(path)
    conv_info, narrow_info = file.tensors.values()
    assert conv_info.shape == (320, 4, 3, 3) and conv_info.stored_shape == (45, 256)
    assert narrow_info.shape == (640, 320) and narrow_info.stored_shape == (800, 256)
    state = file.state_dict()
    assert torch.equal(state["input_blocks.0.0.weight"], torch.from_numpy(conv).half().float())
    reference = gguf.quants.dequantize(tensors["input_blocks.4.0.skip_connection.weight"][0], Q.Q4_K).reshape(640, 320)
    assert same_bits(state["input_blocks.4.0.skip_connection.weight"], reference)
    source = GgufSource(path)
    assert source.shape("input_blocks.0.0.weight") == (320, 4, 3, 3) and source.dtype("input_blocks.0.0.weight") == torch.float16
    assert source.get("input_blocks.0.0.weight").shape == (320, 4, 3, 3)
    assert source.dtype("input_blocks.4.0.skip_connection.weight") == torch.float32
    source.release(source.keys())
    source.close()


def test_stable_diffusion_cpp_names_and_shapes_are_kept(tmp_path: Path) -> None:
    """stable-diffusion.cpp keeps the checkpoint's names (prefix included) and shapes, with no orig_shape keys."""
    conv = np.random.default_rng(4).standard_normal((8, 4, 3, 3)).astype(np.float32)
    name = "model.diffusion_model.input_blocks.0.0.weight"
    file = read_gguf(write_gguf(tmp_path / "sd.gguf", {name: (conv, "F16")}, arch="sd1"))
    assert list(file.tensors) == [name] and file.tensors[name].shape == (8, 4, 3, 3) == file.tensors[name].stored_shape
    assert torch.equal(file.state_dict()[name], torch.from_numpy(conv).half().float())


# --- malformed files: one CheckpointError line naming the file -------------------------------------------


def gstring(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str | bytes, kind: int, payload: bytes) -> bytes:
    return gstring(key) + struct.pack("<I", kind) + payload


def tensor_info(name: str, dims: list[int], qtype: int = 0, offset: int = 0) -> bytes:
    return gstring(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def gguf_bytes(kvs: list[bytes] = (), infos: list[bytes] | None = None, data: bytes | None = None, *, version: int = 3,
               counts: tuple[int, int] | None = None, alignment: int = 32, magic: bytes = b"GGUF") -> bytes:
    """A GGUF file by hand: by default one F32 tensor 'w' of shape (2, 4) at data offset 0."""
    infos = [tensor_info("w", [4, 2])] if infos is None else infos
    data = struct.pack("<8f", *range(8)) if data is None else data
    n_tensors, n_kvs = counts or (len(infos), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kvs) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def int_array(values: list[int], kind: int = 5) -> bytes:
    fmt = {5: "i", 4: "I", 11: "q", 6: "f"}[kind]
    return u32(kind) + struct.pack(f"<Q{len(values)}{fmt}", len(values), *values)


def with_kvs(*kvs: bytes) -> bytes:
    return gguf_bytes(kvs=list(kvs))


def with_infos(*infos: bytes) -> bytes:
    return gguf_bytes(infos=list(infos))


MALFORMED: dict[str, tuple[bytes, str]] = {  # case -> (file, what the refusal says)
    "bad magic": (gguf_bytes(magic=b"GGML"), "not a GGUF file"),
    "short and not GGUF": (b"PK\x03\x04", "not a GGUF file"),
    "version 1": (gguf_bytes(version=1), "unsupported GGUF version 1 (only versions 2 and 3"),
    "version 99": (gguf_bytes(version=99), "unsupported GGUF version 99"),
    "big-endian": (gguf_bytes(version=3 << 24), "big-endian GGUF files are not read"),
    "huge tensor count": (gguf_bytes(counts=(2**40, 0)), "tensor count is 1099511627776 (at most 100000)"),
    "huge metadata count": (gguf_bytes(counts=(1, 2**63)), "metadata count is"),
    "tensor count past the file": (gguf_bytes(counts=(5000, 0)), "truncated: tensor count 5000 needs more"),
    "huge key length": (gguf_bytes(counts=(1, 1))[:24] + struct.pack("<Q", 2**62) + b"k" * 64, "length of metadata key 0 is"),
    "huge string": (with_kvs(kv("s", 8, struct.pack("<Q", 2**40))), "length of metadata 's' is"),
    "huge array": (with_kvs(kv("a", 9, u32(5) + struct.pack("<Q", 2**40))), "length of metadata 'a' is"),
    "array past the file": (with_kvs(kv("a", 9, u32(5) + struct.pack("<Q", 1000))), "truncated: length of metadata 'a' 1000"),
    "unknown value type": (with_kvs(kv("x", 13, b"")), "metadata 'x' has unknown value type 13"),
    "unknown element type": (with_kvs(kv("x", 9, u32(13) + struct.pack("<Q", 1))), "unknown element type 13"),
    "arrays too deep": (with_kvs(kv("x", 9, (u32(9) + struct.pack("<Q", 1)) * 5 + u32(5) + struct.pack("<Q", 0))),
                        "nests arrays more than 4"),
    "duplicate key": (with_kvs(kv("k", 4, u32(1)), kv("k", 4, u32(2))), "metadata key 'k' appears twice"),
    "key not UTF-8": (with_kvs(kv(b"\xff\xfe", 4, u32(1))), "metadata key 0 is not UTF-8"),
    "alignment 0": (with_kvs(kv("general.alignment", 4, u32(0))), "general.alignment 0 is not a power of two"),
    "alignment 48": (with_kvs(kv("general.alignment", 4, u32(48))), "general.alignment 48 is not a power of two"),
    "alignment a string": (with_kvs(kv("general.alignment", 8, gstring("32"))), "general.alignment '32' is not"),
    "five dimensions": (with_infos(tensor_info("w", [1, 1, 1, 1, 8])), "tensor 'w' has 5 dimensions (1 to 4)"),
    "no dimensions": (with_infos(tensor_info("w", [])), "tensor 'w' has 0 dimensions"),
    "a zero dimension": (with_infos(tensor_info("w", [4, 0])), "tensor 'w' has dimensions [4, 0]"),
    "too many values": (with_infos(tensor_info("w", [2**30, 2**30, 2**30])), "at most 281474976710656 values"),
    "offset past the end": (with_infos(tensor_info("w", [4, 2], offset=2**40)), "truncated: tensor 'w' ends at byte"),
    "tensor past the end": (with_infos(tensor_info("w", [4, 3])), "truncated: tensor 'w' ends at byte"),
    "misaligned offset": (with_infos(tensor_info("w", [4, 2], offset=4)),
                          "tensor 'w' starts at data offset 4, not a multiple of the alignment 32"),
    "overlap": (with_infos(tensor_info("w", [4, 2]), tensor_info("v", [2], offset=0)), "tensor 'v' overlaps tensor 'w'"),
    "duplicate tensor": (with_infos(tensor_info("w", [2]), tensor_info("w", [2], offset=32)), "tensor 'w' appears twice"),
    "IQ4_NL": (with_infos(tensor_info("w", [32], qtype=20)),
               "tensor 'w' uses GGML type 20 (IQ4_NL), not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0"),
    "type 99": (with_infos(tensor_info("w", [32], qtype=99)), "tensor 'w' uses GGML type 99 (unknown), not supported"),
    "partial block": (with_infos(tensor_info("w", [48, 2], qtype=8)), "innermost size 48 is not a multiple of Q8_0's block of 32"),
    "orig_shape mismatch": (with_kvs(kv("comfy.gguf.orig_shape.w", 9, int_array([3, 3]))), "does not hold the 8 values of tensor 'w'"),
    "orig_shape of floats": (with_kvs(kv("comfy.gguf.orig_shape.w", 9, int_array([2, 4], 6))), "is not a list of 1 to 4 sizes"),
    "orig_shape a scalar": (with_kvs(kv("comfy.gguf.orig_shape.w", 4, u32(8))), "is not a list of 1 to 4 sizes"),
}


def malformed_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(MALFORMED[case][0])
    return path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    path = malformed_file(tmp_path, case)
    with pytest.raises(CheckpointError) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert MALFORMED[case][1] in message and str(path) in message and "\n" not in message, message


def test_a_valid_hand_built_file_reads(tmp_path: Path) -> None:
    """The malformed cases are edits of this file, which reads (so each refusal is for its own edit)."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(kvs=[kv("comfy.gguf.orig_shape.w", 9, int_array([8], 11))]))
    file = read_gguf(path)
    assert file.tensors["w"].shape == (8,) and torch.equal(file.state_dict()["w"], torch.arange(8.0))


def test_truncation_anywhere_before_the_last_tensor_ends_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    full = write_gguf(tmp_path / "full.gguf", {"a": (rng.standard_normal((2, 64)).astype(np.float32), "Q8_0"),
                                               "b": (rng.standard_normal(3).astype(np.float32), "F32")},
                      **{"general__name": "x", "list": ["p", "qr"]}).read_bytes()
    end = read_gguf(tmp_path / "full.gguf")
    last = max(t.offset + t.nbytes for t in end.tensors.values())
    cut_path = tmp_path / "cut.gguf"
    for cut in [*range(0, end.data_start + 8), *range(end.data_start + 8, last, 7)]:
        cut_path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError) as caught:
            read_gguf(cut_path)
        assert str(cut_path) in str(caught.value) and "\n" not in str(caught.value), (cut, caught.value)
    cut_path.write_bytes(full[:last])  # the writer's padding after the last tensor is not needed
    assert set(read_gguf(cut_path).tensors) == {"a", "b"}


def test_a_header_past_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_module, "HEADER_LIMIT", 64)
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf_bytes(kvs=[kv("s", 8, gstring("x" * 100))]))
    with pytest.raises(CheckpointError, match="header runs past the 0 MiB limit"):
        read_gguf(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
        read_gguf(tmp_path / "model.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_gguf(tmp_path)


# --- the op layer holding GGUF bytes -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "F16"])
def test_layers_holding_gguf_bytes_compute_as_the_dequantised_weight(name: str) -> None:
    torch.manual_seed(0)
    with torch.device("cpu"):
        linear, conv = Linear(512, 6), Conv2d(32, 8, 3, padding=1)
    plain_linear, plain_conv = Linear(512, 6), Conv2d(32, 8, 3, padding=1)
    for layer, plain, shape in ((linear, plain_linear, (6, 512)), (conv, plain_conv, (8, 32, 3, 3))):
        # blocks run over the flattened weight (a conv's 3x3 is no whole block: ComfyUI-GGUF's (n/256, 256) files)
        raw = torch.from_numpy(random_blocks(name, 1, math.prod(shape)) if name in F16_FIELDS
                               else np.random.default_rng(6).standard_normal(shape).astype(np.float16).view(np.uint8)).reshape(-1)
        bias = torch.randn(shape[0])
        layer.hold_gguf(raw, Q[name].value, shape)
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        plain.weight = torch.nn.Parameter(dequantize(raw, Q[name].value, shape), requires_grad=False)
        plain.bias = torch.nn.Parameter(bias, requires_grad=False)
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == raw.numel()
    x, image = torch.randn(3, 512), torch.randn(2, 32, 5, 5)
    assert torch.equal(linear(x), plain_linear(x))
    assert torch.equal(conv(image), plain_conv(image))
    assert torch.equal(linear.compute_weight(torch.bfloat16), plain_linear.weight.bfloat16())  # in the compute dtype


def test_a_patch_never_writes_into_gguf_bytes() -> None:
    layer = Linear(4, 2)
    raw = torch.arange(8, dtype=torch.float32).view(torch.uint8).clone()
    layer.hold_gguf(raw, Q.F32.value, (2, 4))
    layer.weight_patch = lambda weight: weight.add_(1)
    assert torch.equal(layer.compute_weight(torch.float32), torch.arange(1.0, 9.0).view(2, 4))
    assert torch.equal(layer.weight, raw)


def test_hold_gguf_refuses_a_wrong_shape_or_size() -> None:
    layer = Linear(32, 2)
    with pytest.raises(ValueError, match="does not fit"):
        layer.hold_gguf(torch.zeros(68, dtype=torch.uint8), Q.Q8_0.value, (2, 64))
    with pytest.raises(ValueError, match="are not a Q8_0 tensor"):
        layer.hold_gguf(torch.zeros(60, dtype=torch.uint8), Q.Q8_0.value, (2, 32))


# --- inspect, and the loader meeting a GGUF ----------------------------------------------------------------


def test_inspect_lists_architecture_tensors_and_type_shares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(7)
    path = write_gguf(tmp_path / "flux-Q8_0.gguf", {
        "double_blocks.0.img_attn.qkv.weight": (rng.standard_normal((96, 256)).astype(np.float32), "Q8_0"),
        "img_in.weight": (rng.standard_normal((16, 32)).astype(np.float32), "F32"),
        "img_in.bias": (rng.standard_normal(16).astype(np.float32), "F32"),
    }, arch="flux")
    info = describe_checkpoint(path, hashes=False)
    assert info.gguf is not None and info.gguf.architecture == "flux" and info.gguf.tensors == 3
    assert info.gguf.types == {"Q8_0": (1, 96 * 256 // 32 * 34), "F32": (2, (16 * 32 + 16) * 4)}
    text = format_info(info)
    size = path.stat().st_size
    assert f"Q8_0 {96 * 8 * 34 / size:.1%} (1 tensor, " in text and f"F32 {528 * 4 / size:.1%} (2 tensors, " in text
    assert "architecture  flux" in text and "tensors       3" in text and "holds no Flux.1 part" not in text
    code, out, err = cli(capsys, "inspect", path)
    assert code == 0 and "quant types" in out and "Q8_0" in out, err


def test_cli_refuses_a_malformed_gguf_and_one_holding_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = malformed_file(tmp_path, "IQ4_NL")
    code, _, err = cli(capsys, "inspect", bad)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "IQ4_NL" in err, err
    good = tmp_path / "model.gguf"
    good.write_bytes(gguf_bytes())
    with pytest.raises(CheckpointError, match="is a GGUF file, not a pickled checkpoint"):
        load_ckpt(good)
    code, _, err = cli(capsys, "txt2img", "--ckpt", good, "--outdir", tmp_path / "out", "--H", "64", "--W", "64",
                       "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu")
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "no Stable Diffusion keys" in err, err
    assert not (tmp_path / "out").exists()


def test_every_supported_type_has_a_test() -> None:
    assert {t.name for t in GGML_TYPES.values()} == set(BLOCK_TYPES) | {"F32", "F16", "BF16"}
