"""The experts' side of the scale search: candidate slabs swapped in and restored exactly,
each expert's inputs on its routed tokens."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models import batches, tiny_moe

from awq_ao.config import awq_config
from awq_ao.passes.experts import find_experts
from awq_ao.passes.experts_search import (
    ExpertsTaps,
    SlabSwap,
    expert_inputs,
    expert_slabs,
    experts_call,
)
from awq_ao.passes.group_types import ExpertSlabs
from awq_ao.passes.search_loss import fake_quantize_scaled


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 4), n=st.sampled_from([8, 24]), k=st.sampled_from([32, 48, 64]),
       transposed=st.booleans(), seed=st.integers(0, 10_000))
def test_slab_swap_quantizes_every_expert_and_restores_exactly(e, n, k, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(e, n, k, generator=g)
    mod = torch.nn.Module()
    mod.w = torch.nn.Parameter(rows.transpose(1, 2).contiguous() if transposed else rows.clone())
    before = mod.w.data.clone()
    slab = ExpertSlabs("m", "w", transposed)
    assert torch.equal(torch.cat(expert_slabs(mod.w, slab)), rows.reshape(e * n, k))
    assert torch.equal(torch.cat(expert_slabs(mod.w, ExpertSlabs("m", "w", transposed, e - 1))), rows[e - 1])
    s = torch.rand(k, generator=g) + 0.5
    swap = SlabSwap({"m": mod}, [slab], awq_config(group_size=16))
    swap.set(s)
    got = mod.w.data.transpose(1, 2) if transposed else mod.w.data
    for i in range(e):  # each expert's slab as a linear's weight is fake-quantized
        torch.testing.assert_close(got[i], fake_quantize_scaled(rows[i], s, 4, 16, True), rtol=0, atol=0)
    swap.restore()
    assert torch.equal(mod.w.data, before)


def _experts_call(name: str):
    model = tiny_moe(name)
    cfg = awq_config(group_size=32)
    experts = find_experts(model, cfg)
    ename, info = next(iter(experts.items()))
    modules = dict(model.named_modules())
    taps = ExpertsTaps(modules, experts, cfg)
    h = modules[ename].register_forward_pre_hook(lambda m, a, kw: taps.record(ename, a, kw), with_kwargs=True)
    with torch.no_grad():
        model(**batches(1)[0])
    h.remove()
    return modules[ename], info, taps, ename


def test_expert_inputs_are_the_routed_tokens_through_up_and_gate():
    mod, info, taps, name = _experts_call("MixtralForCausalLM")
    hidden, idx = taps.calls[name]
    assert idx.shape[0] == hidden.shape[0]
    for e in range(info.num_experts):
        xe, h, n = expert_inputs(mod, info, hidden, idx, e)
        routed = (idx == e).any(dim=-1)
        assert n == int(routed.sum())
        want_x = hidden[routed].float() if n else hidden.float()  # no token: the whole block's
        assert torch.equal(xe, want_x)
        z = want_x.double() @ mod.gate_up_proj[e].double().t()
        torch.testing.assert_close(h.double(), mod._apply_gate(z), rtol=1e-5, atol=1e-6)


def test_per_expert_grams_are_stored_under_slab_keys():
    mod, info, taps, name = _experts_call("Qwen3MoeForCausalLM")
    grams, tokens, seen = {}, {}, []
    taps.per_expert(name, grams, tokens, lambda e, h: seen.append((e, h.shape)))
    assert [e for e, _ in seen] == list(range(info.num_experts))
    assert all(shape[-1] == info.inter for _, shape in seen)
    for e in range(info.num_experts):  # rounding="gptq" (the default): full Grams of both inputs
        assert grams[f"{name}.{info.up_attr}[{e}]"].shape == (info.hidden, info.hidden)
        assert grams[f"{name}.down_proj[{e}]"].shape == (info.inter, info.inter)
    assert len(taps.tokens[name]) == info.num_experts


def test_expert_grams_cover_every_kept_row(monkeypatch):
    """Experts' input Grams, like the linears', average over every kept calibration row (the
    search chunk's routed tokens and those of the replayed rows), not the search chunk only."""
    import warnings

    import awq_ao
    import awq_ao.passes.experts_apply as experts_apply
    from awq_ao.passes.rounding import full_gram

    model = tiny_moe("MixtralForCausalLM")
    name, info = next(iter(find_experts(model, awq_config(group_size=32)).items()))
    mod = model.get_submodule(name)
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a, kw: seen.append(experts_call(a, kw)), with_kwargs=True)
    data = batches(4)
    with torch.no_grad():
        for b in data:
            model(**b)
    h.remove()
    routed = [torch.cat([x for x, _, n in (expert_inputs(mod, info, *c, e) for c in seen) if n])
              for e in range(info.num_experts)]
    got = {}
    real = experts_apply.quantize_experts

    def spy(root, experts, scales, grams, *a, **kw):
        got.update({k: v.clone() for k, v in grams.items() if k.startswith(name + ".")})
        return real(root, experts, scales, grams, *a, **kw)

    monkeypatch.setattr(experts_apply, "quantize_experts", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(model, data, group_size=32, n_grid=3, max_search_samples=2, sequential=False,
                        progress=False, verbose=False)
    for e in range(info.num_experts):
        torch.testing.assert_close(got[f"{name}.{info.up_attr}[{e}]"], full_gram(routed[e]), rtol=1e-4, atol=1e-5)

