"""Textual-inversion files in AUTOMATIC1111's formats, read without a plain torch.load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from optimized_sd.errors import UserError
from optimized_sd.weights.embeddings import EmbeddingLibrary, TowerEmbeddings, read_embedding


def test_formats(tmp_path: Path) -> None:
    vectors = torch.randn(3, 64)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "a1111", "step": 100}, tmp_path / "a1111.pt")
    save_file({"emb_params": vectors}, str(tmp_path / "kohya.safetensors"))
    torch.save({"<concept>": vectors[0]}, tmp_path / "concept.bin")
    save_file({"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 96)}, str(tmp_path / "pair.safetensors"))
    for name, expected in [("a1111", vectors), ("kohya", vectors), ("concept", vectors[:1])]:
        embedding = read_embedding(next(tmp_path.glob(name + ".*")))
        assert embedding.name == name
        torch.testing.assert_close(embedding.for_towers((64,))[0], expected)
    pair = read_embedding(tmp_path / "pair.safetensors")
    assert [v.shape for v in pair.for_towers((64, 96))] == [(2, 64), (2, 96)]
    with pytest.raises(UserError, match=r"pair \(pair.safetensors\) is for SDXL \(clip_l \+ clip_g vectors\); .* takes 64-wide"):
        pair.for_towers((64,))
    with pytest.raises(UserError, match=r"is for SD 2.x \(1024-wide vectors\)"):
        save_file({"emb_params": torch.randn(1, 1024)}, str(tmp_path / "v2.safetensors"))
        read_embedding(tmp_path / "v2.safetensors").for_towers((768,))


def test_library_finds_files_by_stem_and_reads_them_when_used(tmp_path: Path) -> None:
    save_file({"emb_params": torch.randn(2, 64)}, str(tmp_path / "style.safetensors"))
    (tmp_path / "sub").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}}, tmp_path / "sub" / "bad-hands.pt")
    save_file({"x.lora_down.weight": torch.randn(2, 4), "x.lora_up.weight": torch.randn(4, 2)}, str(tmp_path / "not_ti.safetensors"))
    (tmp_path / "broken.pt").write_bytes(b"junk")
    library = EmbeddingLibrary(tmp_path)
    assert sorted(library) == ["bad-hands", "broken", "style"]  # broken is only read when a prompt names it
    tower = TowerEmbeddings(library, (64,))
    assert tower["bad-hands"].shape == (1, 64)
    with pytest.raises(UserError):
        tower["broken"]
    assert len(EmbeddingLibrary(tmp_path / "absent")) == 0


def test_bad_embedding_files(tmp_path: Path) -> None:
    save_file({"a": torch.randn(2, 4), "b": torch.randn(2, 4)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match="not an embedding"):
        read_embedding(tmp_path / "two.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(1, 4), "x": torch.randn(1, 4)}}, tmp_path / "multi.pt")
    with pytest.raises(UserError, match="exactly one"):
        read_embedding(tmp_path / "multi.pt")
