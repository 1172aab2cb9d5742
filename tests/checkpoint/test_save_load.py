"""awq_ao checkpoints: save -> load round trips, tied weights, generate, and damaged input."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import int4_layers, logits, mixed_rtn_llama, quantized, tied_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import awq_ao.checkpoint.atomic_dir as atomic_mod
import awq_ao.checkpoint.save as save_mod
from awq_ao.checkpoint import CheckpointError, checkpoint_summary, load_quantized, save_quantized
from awq_ao.lowering import Int4WeightTensor
from awq_ao.lowering.scaled_input import ScaledInputLinear


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _assert_same_quantization(a: torch.nn.Module, b: torch.nn.Module) -> None:
    la, lb = int4_layers(a), int4_layers(b)
    assert la.keys() == lb.keys() and la
    for n in la:
        wa, wb = la[n], lb[n]
        assert (wa.bits, wa.group_size, wa.shape, wa.dtype) == (wb.bits, wb.group_size, wb.shape, wb.dtype), n
        assert torch.equal(wa.codes(), wb.codes()), n
        assert torch.equal(wa.scale, wb.scale) and torch.equal(wa.zero, wb.zero), n


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_roundtrip_identical_outputs(arch, tmp_path):
    model = quantized(arch)
    out = save_quantized(model, tmp_path / "ckpt")
    assert _files(out) == [".awq_ao-checkpoint", "README.md", "awq_ao_manifest.json", "config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "awq_ao" and qc["format_version"] == 3
    assert (qc["bits"], qc["group_size"], qc["zero_point"]) == (4, 32, True)
    assert qc["quantized_modules"] == sorted(int4_layers(model))
    scaled = sorted(n for n, m in model.named_modules() if isinstance(m, ScaledInputLinear))
    assert qc["scaled_input_modules"] == scaled
    if arch == "gpt2":
        assert scaled, "gpt2's mlp.c_proj has no foldable producer: expected ScaledInputLinear"

    loaded = load_quantized(out)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded), logits(model))
    _assert_same_quantization(model, loaded)
    for n in scaled:
        m = loaded.get_submodule(n)
        assert isinstance(m, ScaledInputLinear)
        assert torch.equal(m.input_scale, model.get_submodule(n).input_scale)
    # loading never leaves meta tensors or requires grad on quantized weights
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.config.quantization_config["quant_method"] == "awq_ao"


def test_tensors_are_packed_not_pickled(tmp_path):
    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert meta["format"] == "pt" and meta["awq_ao_format_version"] == "3"
    assert "model.layers.0.self_attn.q_proj.weight_packed" not in keys  # the codes carry the weight's name
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (64, 32)  # nibbles: K/2 bytes
    w = model.model.layers[0].self_attn.q_proj.weight
    lo, hi = packed & 15, packed >> 4
    assert torch.equal(torch.stack([lo, hi], -1).reshape(64, 64), w.codes())


def test_tied_embeddings(tmp_path):
    model = quantized("tied_llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_quantized(model, tmp_path / "ckpt")
    keys = load_file(str(out / "model.safetensors")).keys()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_generate_after_load(tmp_path):
    model = quantized("tied_llama")
    loaded = load_quantized(save_quantized(model, tmp_path / "ckpt"))
    x = torch.tensor([[5, 17, 3, 42]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = loaded.generate(x, **kw)
        want = model.generate(x, **kw)
    assert got.shape == (1, 10)
    assert torch.equal(got, want)


def test_mixed_bits_layouts_and_ragged_groups(tmp_path):
    model = mixed_rtn_llama()
    layouts = {w.pack_layout for w in int4_layers(model).values()}
    assert {"nibble", "byte"} <= layouts
    out = save_quantized(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["module_overrides"]["model.layers.0.self_attn.k_proj"] == {"bits": 3, "group_size": 48}
    loaded = load_quantized(out)
    _assert_same_quantization(model, loaded)
    assert torch.equal(logits(loaded), logits(model))


def test_sharded_save_and_dtype_override(tmp_path):
    model = quantized("qwen2")
    out = save_quantized(model, tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    loaded = load_quantized(out)
    assert torch.equal(logits(loaded), logits(model))
    bf = load_quantized(out, dtype=torch.bfloat16)
    assert bf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert bf.model.norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(bf).float(), logits(model), atol=0.3, rtol=0.1)


def test_summary(tmp_path):
    out = save_quantized(quantized("gpt2"), tmp_path / "ckpt")
    s = checkpoint_summary(out)
    assert s["format"] == "awq_ao" and s["architecture"] == "GPT2LMHeadModel"
    assert s["num_quantized_layers"] == 8 and len(s["scaled_input_layers"]) == 2
    assert s["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_quantized(quantized("llama"), tmp_path / "ckpt", max_shard_size="30KB")


def test_missing_shard(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}"):
        load_quantized(saved)


def test_truncated_shard(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is truncated"):
        load_quantized(saved)
    victim.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(saved)


def test_unknown_format_version(saved):
    _edit_config(saved, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="unsupported awq_ao checkpoint format version 99"):
        load_quantized(saved)


def test_config_shape_mismatch(saved):
    _edit_config(saved, lambda c: c.update(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight. has shape \[64, 64\].*expects \[64, 48\]"):
        load_quantized(saved)


def test_config_dtype_mismatch(saved):
    _edit_config(saved, lambda c: c.update(dtype="bfloat16"))
    with pytest.raises(CheckpointError, match="is float32 in the checkpoint; config.json says bfloat16"):
        load_quantized(saved)


def test_not_quantized_or_unknown_method(tmp_path):
    d = tmp_path / "fp"
    tiny_model("llama").save_pretrained(d)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(d)
    _edit_config(d, lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(CheckpointError, match="'gptq' is not supported"):
        load_quantized(d)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_quantized(tmp_path / "nope")


def _rewrite_single(out: Path, fn) -> None:
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    # as another tool would write it: no manifest, so the loader's own key/shape checks answer
    (out / "awq_ao_manifest.json").unlink(missing_ok=True)


def test_unknown_and_missing_keys(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    _rewrite_single(out, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unknown tensor.*model\.layers\.0\.extra\.weight"):
        load_quantized(out)
    _rewrite_single(out, lambda t: (t.pop("model.layers.0.extra.weight"), t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.norm\.weight"):
        load_quantized(out)


def test_quantized_tensor_mismatch(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    key = "model.layers.1.mlp.down_proj.weight_scale"
    _rewrite_single(out, lambda t: t.update({key: t[key][:, :2].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{key}.*shape \[64, 2\].*expects \[64, 4\]"):
        load_quantized(out)
    out = save_quantized(quantized("llama"), out, overwrite=True)
    _edit_config(out, lambda c: c["quantization_config"]["quantized_modules"].append("model.nothing"))
    with pytest.raises(CheckpointError, match="model.nothing"):
        load_quantized(out)


def test_existing_directory(tmp_path):
    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(model, out)
    other = quantized("tied_llama")
    save_quantized(other, out, overwrite=True)
    assert torch.equal(logits(load_quantized(out)), logits(other))
    assert _files(tmp_path) == ["ckpt"]  # no temp or backup directories left
    notmodel = tmp_path / "home"
    notmodel.mkdir()
    (notmodel / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a model directory"):
        save_quantized(model, notmodel, overwrite=True)
    assert (notmodel / "notes.txt").read_text() == "keep me"


def _disk_full_after(nbytes: int):
    def fake_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * nbytes)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    return fake_save_file


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    model = quantized("llama")
    monkeypatch.setattr(save_mod, "save_file", _disk_full_after(1000))
    with pytest.raises(OSError) as ei:
        save_quantized(model, tmp_path / "new")
    assert ei.value.errno == errno.ENOSPC and "nothing was written" in str(ei.value)
    assert _files(tmp_path) == []


def test_disk_full_keeps_previous_directory(tmp_path, monkeypatch):
    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ckpt")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    monkeypatch.setattr(save_mod, "save_file", _disk_full_after(10))
    with pytest.raises(OSError, match="no space left"):
        save_quantized(quantized("tied_llama"), out, overwrite=True)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert before == after
    assert _files(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    assert torch.equal(logits(load_quantized(out)), logits(model))


def test_interrupted_save_never_looks_valid(tmp_path, monkeypatch):
    """Even when the process dies mid-save (simulated: cleanup disabled), the target does not
    exist and the leftover is a hidden temp directory without config.json."""
    model = quantized("llama")
    monkeypatch.setattr(atomic_mod.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(save_mod, "write_json", _raise_keyboard_interrupt_on_config)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".ckpt.tmp-")
    assert not (left[0] / "config.json").exists()


_real_write_json = save_mod.write_json


def _raise_keyboard_interrupt_on_config(path, obj):
    if Path(path).name == "config.json":
        raise KeyboardInterrupt
    _real_write_json(path, obj)


def test_refuses_unquantized_or_non_hf_model(tmp_path):
    with pytest.raises(CheckpointError, match="no quantized"):
        save_quantized(tiny_model("llama"), tmp_path / "a")
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lin[0].weight = torch.nn.Parameter(Int4WeightTensor.from_float(lin[0].weight.detach(), group_size=32), requires_grad=False)
    with pytest.raises(CheckpointError, match="no transformers config"):
        save_quantized(lin, tmp_path / "b")
    assert not os.listdir(tmp_path)


def test_tied_llama_helper_is_tied():
    m = tied_llama()
    assert m.lm_head.weight is m.model.embed_tokens.weight
