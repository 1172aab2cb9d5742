"""The algorithm on one root (passes/pipeline): whole model and one block agree; sequential mode
searches a block's sub-blocks one after the other (attention, then MLP)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import compare_two_converts, tiny_model, token_batches

from awq_ao.config import AWQConfig
from awq_ao.observers.activation import RecordedCall
from awq_ao.passes.pipeline import analyze, block_stages
from awq_ao.report import ConvertReport


def _stages(arch: str):
    model = tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    block = model.model.layers[0] if hasattr(model, "model") and hasattr(model.model, "layers") else model.gpt_neox.layers[0]
    targets = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    captured = {}

    def hook(mod, args, kwargs):
        captured["call"] = (args, kwargs)

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(token_batches(1, 2, 16)[0], use_cache=False)
    h.remove()
    a, kw = captured["call"]
    analysis = analyze(block, RecordedCall(a, kw, 2), targets, AWQConfig(), ConvertReport(4, 128, True))
    return block_stages(analysis, targets)


def test_llama_block_splits_into_attention_then_mlp():
    stages = _stages("llama")
    assert stages is not None and len(stages) == 2
    (g_attn, t_attn), (g_mlp, t_mlp) = stages
    assert all(t.startswith("self_attn.") for t in t_attn) and len(t_attn) == 4
    assert all(t.startswith("mlp.") for t in t_mlp) and len(t_mlp) == 3
    assert len(g_attn) == 2 and len(g_mlp) == 2  # norm->qkv, v->o ; norm->gate/up, up->down


def test_group_spanning_children_or_moe_is_not_split():
    from types import SimpleNamespace as NS

    def group(consumers, producer=None):
        kind = "linear" if producer else "norm"
        return NS(consumers=consumers, rescaled=[], producer=NS(kind=kind, module=producer))

    local = ["attn.q", "attn.o", "mlp.fc1", "mlp.fc2"]
    split = NS(groups=[group(["attn.q"]), group(["attn.o"], "attn.q"), group(["mlp.fc1"]), group(["mlp.fc2"], "mlp.fc1")], experts={})
    assert [t for _, t in block_stages(split, local)] == [["attn.q", "attn.o"], ["mlp.fc1", "mlp.fc2"]]
    # one norm feeding attention and MLP (GPT-J / Phi-1 parallel blocks): one group spans both
    parallel = NS(groups=[group(["attn.q", "mlp.fc1"]), group(["attn.o"], "attn.q")], experts={})
    assert block_stages(parallel, local) is None
    # a linear producer in another child than its consumer
    cross = NS(groups=[group(["mlp.fc1"], "attn.o")], experts={})
    assert block_stages(cross, local) is None
    assert block_stages(NS(groups=split.groups, experts={"mlp.experts": object()}), local) is None
    assert block_stages(split, ["mlp.fc1", "mlp.fc2"]) is None


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_split_and_whole_blocks_both_quantize_everything(arch):
    ra, rb, ea, eb = compare_two_converts(
        arch, 2, {"sequential": True, "split_blocks": True}, {"sequential": True, "split_blocks": False}
    )
    assert sorted(ra.quantized) == sorted(rb.quantized)
    assert ra.kind_counts() == rb.kind_counts()
    # the same groups searched (whether each keeps a scale or plain rounding wins may differ)
    assert sorted((g.producer, tuple(g.consumers)) for g in ra.groups) == sorted(
        (g.producer, tuple(g.consumers)) for g in rb.groups)
    assert ea < 1.5 * eb + 1e-9, (ea, eb)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_one_root_whole_model_and_its_block_give_the_same_groups_and_codes(arch):
    """awq_root is the algorithm on one root: on a one-block model, the whole model as the
    root (sequential=False) and its block as the root (layer by layer) find the same groups,
    pick the same scales and store the same codes."""
    import warnings

    import awq_ao
    from awq_ao.lowering import Int4WeightTensor

    runs = []
    for sequential in (False, True):
        model = tiny_model(arch, layers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = awq_ao.quantize(model, token_batches(4, seq=32), group_size=32, sequential=sequential,
                                  progress=False, verbose=False)
        assert rep.mode.startswith("layer by layer") == sequential
        codes = {n: (p.dequantize(), p.scale, p.zero) for n, p in model.named_parameters() if isinstance(p, Int4WeightTensor)}
        runs.append(([(g.kind, g.producer, g.consumers, g.alpha) for g in rep.groups], codes))
    (groups_a, codes_a), (groups_b, codes_b) = runs
    assert groups_a == groups_b and len(groups_a) >= 2
    assert codes_a.keys() == codes_b.keys() and codes_a
    for n in codes_a:
        assert all(torch.equal(x, y) for x, y in zip(codes_a[n], codes_b[n], strict=True)), n
