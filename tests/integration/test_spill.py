"""Sequential convert with ``spill_dir``: rollback originals live on disk, results unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import assert_unchanged, snapshot, tiny_model, token_batches
from torch import nn
from torchao.quantization import quantize_

import awq_ao
from awq_ao import awq_config, get_state, whole_model
from awq_ao.passes.fold import Transaction


def _prepared(arch: str = "llama", layers: int = 2):
    model = tiny_model(arch, layers=layers)
    quantize_(model, awq_config(step="prepare"), filter_fn=whole_model)
    with torch.no_grad():
        for b in token_batches(2):
            model(b)
    return model


def _convert(model, **kw):
    quantize_(model, awq_config(group_size=32, verbose=False, progress=False, sequential=True, **kw), filter_fn=whole_model)
    return get_state(model).report


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_spill_gives_identical_model_and_cleans_up(arch, tmp_path):
    a = _prepared(arch)
    b = copy.deepcopy(a)
    ra = _convert(a)
    rb = _convert(b, spill_dir=str(tmp_path))
    assert ra.spilled_bytes == 0 and rb.spilled_bytes > 0
    assert "kept on disk" in rb.summary()
    assert list(tmp_path.iterdir()) == []  # the private folder is removed when convert ends
    x = token_batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


def test_failure_after_spill_restores_model(monkeypatch, tmp_path):
    model = _prepared(layers=3)
    snap = snapshot(model)
    import awq_ao.lowering.swap as swap

    real = swap.quantize_linear_module
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 16:  # third block: blocks 0 and 1 were quantized and spilled
            raise RuntimeError("simulated failure in the middle of convert")
        return real(*a, **k)

    monkeypatch.setattr(swap, "quantize_linear_module", flaky)
    spilled = []
    real_spill = Transaction.spill
    monkeypatch.setattr(Transaction, "spill", lambda self, *a: spilled.append(real_spill(self, *a)) or spilled[-1])
    with pytest.raises(RuntimeError, match="simulated"):
        _convert(model, spill_dir=str(tmp_path))
    assert len(spilled) == 2 and all(n > 0 for n in spilled)
    assert_unchanged(model, snap)
    assert list(tmp_path.iterdir()) == []
    assert get_state(model).phase == "prepared"


def test_disk_full_is_a_clear_error_and_restores_model(monkeypatch, tmp_path):
    model = _prepared()
    snap = snapshot(model)
    import awq_ao.passes.fold as fold

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fold.torch, "save", full)
    with pytest.raises(OSError, match=r"rollback originals to .*No space left.*spill_dir=None"):
        _convert(model, spill_dir=str(tmp_path))
    assert_unchanged(model, snap)


def test_spilled_transaction_unit(tmp_path):
    """Replaced modules' parameters are spilled too and come back on rollback."""
    model = tiny_model("llama", layers=1)
    lin = model.model.layers[0].mlp.down_proj
    w0 = lin.weight.detach().clone()
    txn = Transaction(tmp_path)
    txn.set_param(lin, "weight", lin.weight.detach() * 2)
    txn.set_module(model, "model.layers.0.mlp.down_proj", torch.nn.Identity())
    assert txn.spill(min_bytes=1) > 0
    assert lin.weight.device.type == "meta"  # the original left memory
    txn.rollback()
    txn.close()
    assert model.model.layers[0].mlp.down_proj is lin and torch.equal(lin.weight, w0)
    assert isinstance(lin.weight, torch.nn.Parameter)
    assert list(tmp_path.iterdir()) == []


def test_spill_dir_needs_layer_by_layer():
    with pytest.raises(ValueError, match="layer-by-layer"):
        awq_config(spill_dir="/tmp", sequential=False)
    assert awq_config(spill_dir="/tmp").sequential == "auto"  # the default mode spills


def test_spill_dir_without_a_block_stack_names_the_problem(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="spill_dir"):
        awq_ao.quantize(model, [torch.randn(4, 64)], group_size=32, spill_dir=tmp_path,
                        verbose=False, progress=False)


def test_one_call_helper_takes_spill_dir(tmp_path):
    model = tiny_model("llama", layers=2)
    report = awq_ao.quantize(model, token_batches(2), group_size=32, sequential=True, spill_dir=tmp_path,
                             verbose=False, progress=False)
    assert report.spilled_bytes > 0 and len(report.quantized) == 14


def test_originals_follow_their_block_home():
    """Sequential mode with a compute device: originals recorded on the device go home."""
    model = tiny_model("llama", layers=1)
    lin = model.model.layers[0].mlp.down_proj
    txn = Transaction()
    txn.set_param(lin, "weight", lin.weight.detach() * 2)
    txn.move_saved("meta")  # stands in for "the block's home" (no GPU here)
    (_, _, old), = txn._log
    assert old.device.type == "meta" and isinstance(old, torch.nn.Parameter)
