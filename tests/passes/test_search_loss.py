"""``search_loss``: score candidate scales on the enclosing module or on the linears' own outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao.passes.search import candidate_scales, fake_quantize_scaled, weight_mean


def _quantize_counting_attention(model, data, **kw):
    calls = {"n": 0}
    attn = model.model.layers[0].self_attn
    h = attn.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        rep = awq_ao.quantize(model, data, group_size=32, verbose=False, progress=False, **kw)
    finally:
        h.remove()
    return rep, calls["n"]


def test_linear_loss_does_not_run_the_attention_per_candidate():
    model = tiny_model("llama", layers=1)
    data = token_batches(2, 2, 16)
    _, n_module = _quantize_counting_attention(copy.deepcopy(model), data, n_grid=10, sequential=False)
    _, n_linear = _quantize_counting_attention(copy.deepcopy(model), data, n_grid=10, sequential=False,
                                               search_loss="linear")
    assert n_module >= n_linear + 10  # one attention call per candidate (and the RTN baseline)
    assert n_linear <= 4  # calibration and the search replay only


def test_linear_loss_picks_the_alpha_with_the_least_qkv_output_error():
    """The q/k/v group's alpha is the argmin over the grid of the float64 output MSE of q, k, v."""
    n_grid = 10
    model = tiny_model("llama", layers=1)
    data = token_batches(2, 2, 16)
    attn = model.model.layers[0].self_attn
    seen: list[torch.Tensor] = []
    h = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in data:
            model(b)
    h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()
    weights = [attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach()]
    x_mean = x.abs().mean(0).float()
    w_mean = weight_mean(weights, 32)

    def loss(s):
        err = sum(float((x @ (w.double() - fake_quantize_scaled(w, s, 4, 32, True).double()).t()).pow(2).sum())
                  for w in weights)
        return err / (x.shape[0] * sum(w.shape[0] for w in weights))

    losses = [loss(candidate_scales(x_mean, w_mean, i / n_grid, None)) for i in range(n_grid)]
    rtn = loss(None)
    rep = awq_ao.quantize(model, data, group_size=32, n_grid=n_grid, search_loss="linear", sequential=False,
                          rounding="nearest", clip=False, verbose=False, progress=False)
    grp = next(g for g in rep.groups if "self_attn.q_proj" in " ".join(g.consumers))
    best = min(range(n_grid), key=lambda i: (losses[i], i))
    if losses[best] < rtn:
        assert grp.alpha == pytest.approx(best / n_grid)
        assert grp.loss_best == pytest.approx(losses[best], rel=1e-4)
    else:
        assert grp.alpha is None
    assert grp.loss_rtn == pytest.approx(rtn, rel=1e-4)


def test_search_loss_is_validated():
    with pytest.raises(ValueError, match="search_loss"):
        awq_ao.awq_config(search_loss="mlp")


def test_attention_loss_runs_the_attention_but_not_the_mlp_per_candidate():
    model = tiny_model("llama", layers=1)
    data = token_batches(2, 2, 16)
    counts = {}
    for mode in ("module", "attention", "linear"):
        m = copy.deepcopy(model)
        layer = m.model.layers[0]
        n = {"attn": 0, "mlp": 0}
        hs = [layer.self_attn.register_forward_pre_hook(lambda *a, n=n: n.__setitem__("attn", n["attn"] + 1)),
              layer.mlp.register_forward_pre_hook(lambda *a, n=n: n.__setitem__("mlp", n["mlp"] + 1))]
        awq_ao.quantize(m, data, group_size=32, n_grid=10, sequential=False, search_loss=mode,
                        verbose=False, progress=False)
        for h in hs:
            h.remove()
        counts[mode] = n
    assert counts["attention"]["attn"] == counts["module"]["attn"] >= counts["linear"]["attn"] + 10
    assert counts["attention"]["mlp"] == counts["linear"]["mlp"] <= counts["module"]["mlp"] - 10
