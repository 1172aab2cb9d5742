"""Checkpoints named by hub id resolve through the local Hugging Face cache (offline here)."""

from __future__ import annotations

import shutil

import huggingface_hub
import pytest
import torch
import transformers
from checkpoint_helpers import logits, quantized

from awq_ao.checkpoint import CheckpointError, checkpoint_summary, load_quantized, save_quantized


def _fake_cache(root, repo_id: str, src) -> None:
    """Lay ``src`` out as huggingface_hub's cache does for a downloaded model repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_from_the_cache(tmp_path, offline_cache, monkeypatch):
    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ckpt")
    _fake_cache(offline_cache, "someone/tiny-awq", out)
    monkeypatch.chdir(tmp_path)  # no folder named like the id here
    got = load_quantized("someone/tiny-awq")
    assert torch.equal(logits(got), logits(model))
    assert checkpoint_summary("someone/tiny-awq")["format"] == "awq_ao"
    hf = transformers.AutoModelForCausalLM.from_pretrained("someone/tiny-awq", cache_dir=str(offline_cache))
    assert torch.equal(logits(hf), logits(model))


def test_unknown_ids_and_paths(tmp_path, offline_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="someone/missing: not a local folder.*Hugging Face cache"):
        load_quantized("someone/missing")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_quantized(tmp_path / "nope" / "deeper" / "x")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a file"):
        load_quantized(tmp_path / "file.json")
