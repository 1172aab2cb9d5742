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


def test_cli_eval_baseline_of_a_cached_hub_model_with_bin_weights(tmp_path, text_file):
    """A hub id whose cached snapshot holds pytorch_model.bin (not safetensors) evaluates as
    the unquantized baseline (transformers resolves it from the cache)."""
    import os
    import subprocess
    import sys

    from checkpoint_helpers import char_tokenizer, tied_llama

    src = tmp_path / "src"
    model = tied_llama(seed=1)
    model.save_pretrained(src)
    for f in src.glob("*.safetensors"):  # transformers 5 writes safetensors only: make it a .bin model
        f.unlink()
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, src / "pytorch_model.bin")
    char_tokenizer().save_pretrained(src)
    assert (src / "pytorch_model.bin").is_file() and not list(src.glob("*.safetensors"))
    cache = tmp_path / "hub"
    _fake_cache(cache, "someone/tiny-fp", src)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    r = subprocess.run(
        [sys.executable, "-m", "awq_ao.cli", "eval", "someone/tiny-fp", "--text", str(text_file),
         "--windows", "1", "--seq-len", "32", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert "unquantized" in r.stdout and "perplexity:" in r.stdout
