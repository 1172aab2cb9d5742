"""Folding AWQ scales leaves a model's output unchanged (float64, random shapes and scales)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS, EXPECTED, VOCAB, tiny_model

from awq_ao.observers.activation import RecordedCall
from awq_ao.observers.attach import is_quantizable, output_head_names
from awq_ao.passes.capture import capture
from awq_ao.passes.fold import Transaction, fold_group
from awq_ao.passes.groups import find_groups


def analyse(model, ids):
    heads = output_head_names(model)
    targets = [n for n, m in model.named_modules() if is_quantizable(m) and n not in heads]
    ep = capture(model, RecordedCall((ids,), {}, ids.shape[0]))
    return find_groups(ep, model, targets), targets


def fold_random(arch: str, hidden_per_head: int, heads: int, kv_div: int, inter: int, seed: int):
    kv = max(1, heads // kv_div)
    model = tiny_model(arch, hidden=heads * hidden_per_head, heads=heads, kv_heads=kv, inter=inter, layers=2, dtype=torch.float64, seed=seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis, targets = analyse(model, ids)
    g = torch.Generator().manual_seed(seed + 1)
    txn = Transaction()
    folded = 0
    for grp in analysis.groups:
        if not grp.foldable:
            continue
        s_prod = torch.rand(grp.producer.out_channels, generator=g, dtype=torch.float64) * 3.75 + 0.25
        s_x = s_prod[grp.channel_map]
        fold_group(model, grp, s_x, txn)
        folded += 1
    with torch.no_grad():
        out = model(ids).logits
    # float64 model; some norms compute in float32 internally, so allow float32 rounding
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-6, f"{arch}: folding changed the output (relative error {err:.2e})"
    txn.rollback()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"rollback did not restore {k}"
    return analysis, folded


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate], database=None)
@given(
    arch=st.sampled_from(ARCHS),
    hidden_per_head=st.sampled_from([8, 12, 16]),
    heads=st.sampled_from([2, 4, 6]),
    kv_div=st.sampled_from([1, 2]),
    inter=st.integers(min_value=24, max_value=80),
    seed=st.integers(0, 10_000),
)
def test_fold_preserves_output_random(arch, hidden_per_head, heads, kv_div, inter, seed):
    fold_random(arch, hidden_per_head, heads, kv_div, inter, seed)


def test_fold_every_arch_groups_as_expected():
    for arch in ARCHS:
        analysis, folded = fold_random(arch, 16, 4, 2, 48, seed=3)
        kinds: dict[str, int] = {}
        fallback = 0
        for grp in analysis.groups:
            if grp.foldable:
                kinds[grp.producer.kind] = kinds.get(grp.producer.kind, 0) + 1
            else:
                fallback += 1
        exp_kinds, exp_fb = EXPECTED[arch]
        layers = 2
        assert kinds == {k: v * layers for k, v in exp_kinds.items()}, (arch, kinds, [(g.consumers, g.reason) for g in analysis.groups])
        assert fallback == exp_fb * layers, (arch, [(g.consumers, g.reason) for g in analysis.groups if not g.foldable])
        assert not analysis.unseen


def test_gqa_scales_tied():
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=1, inter=48, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 8))
    analysis, _ = analyse(model, ids)
    vo = [g for g in analysis.groups if g.producer.kind == "linear" and g.consumers[0].endswith("o_proj")]
    assert vo and all(g.tie_groups() is not None for g in vo)
    cmap = vo[0].channel_map
    # 4 query heads share the single kv head: o_proj channel h*16+d reads v channel d
    assert torch.equal(cmap, torch.arange(64) % 16)
