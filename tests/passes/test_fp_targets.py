"""Full-precision targets: the corrected weight and the cross Grams against float64 references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao.config import awq_config
from awq_ao.passes.fp_targets import corrected_weight, cross_grams


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 8), t=st.integers(1, 40), damp=st.sampled_from([0.01, 0.1, 1.0]),
       seed=st.integers(0, 2**16))
def test_corrected_weight_solves_the_damped_least_squares(n, k, t, damp, seed):
    """Q* = argmin ||X_fp W^T - X_q Q^T||^2 / T + lam ||Q - W||^2, solved by float64 lstsq."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    xq = torch.randn(t, k, generator=g, dtype=torch.float64)
    xfp = xq + 0.3 * torch.randn(t, k, generator=g, dtype=torch.float64)
    h = xq.t() @ xq / t
    m = xq.t() @ (xfp - xq) / t
    got = corrected_weight(w, m, h, damp)
    lam = damp * float(torch.diagonal(h).mean())
    a = torch.cat([xq / t**0.5, lam**0.5 * torch.eye(k, dtype=torch.float64)])
    b = torch.cat([xfp @ w.t() / t**0.5, lam**0.5 * w.t()])
    want = torch.linalg.lstsq(a, b).solution.t()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_equal_streams_leave_the_weight_unchanged():
    """No upstream error (M = 0): the weight is returned as it was."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    x = torch.randn(30, 7, generator=g)
    h = x.t() @ x / 30
    torch.testing.assert_close(corrected_weight(w, torch.zeros(7, 7), h, 0.1), w, rtol=0, atol=0)


def test_dead_channels_get_no_correction():
    """A channel the quantized stream never saw (zero Gram row) is left alone, not divided by 0."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(20, 4, generator=g, dtype=torch.float64)
    xq[:, 2] = 0
    xfp = xq + torch.randn(20, 4, generator=g, dtype=torch.float64)
    h = xq.t() @ xq / 20
    m = xq.t() @ (xfp - xq) / 20
    out = corrected_weight(w, m, h, 0.1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], w[:, 2])


def _block_and_calls(rows: int, seq: int = 6):
    model = tiny_model("llama", layers=1).double()
    block = model.model.layers[0]
    calls = []
    handle = block.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (rows, seq)), use_cache=False)
    handle.remove()
    return block, calls[0]


def _with(call, h):
    a, kw = call
    if a:
        return (h, *a[1:]), kw
    kw = dict(kw)
    kw["hidden_states"] = h
    return a, kw


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_cross_grams_match_the_inputs_of_both_streams(chunk):
    """M = X_q^T (X_fp - X_q) / T over every row, whatever the chunk; q/k/v share one M; the
    full-precision output is the block's on the full-precision hidden state."""
    rows = 5
    block, call = _block_and_calls(rows)
    h_q = call[0][0] if call[0] else call[1]["hidden_states"]
    h_fp = h_q + 0.1 * torch.randn(h_q.shape, generator=torch.Generator().manual_seed(3), dtype=h_q.dtype)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.setdefault(n, []).append(a[0])) for n in names]
    with torch.no_grad():
        want_out = block(*_with(call, h_fp)[0], **_with(call, h_fp)[1])
        want_out = want_out[0] if isinstance(want_out, tuple) else want_out
        a, kw = _with(call, h_q)
        block(*a, **kw)
    for hk in hooks:
        hk.remove()
    before = copy.deepcopy(block.state_dict())
    cross, out = cross_grams(block, names, _with(call, h_q), _with(call, h_fp), rows, chunk)
    for n in names:
        xfp, xq = (x.reshape(-1, x.shape[-1]) for x in inputs[n])
        torch.testing.assert_close(cross[n], xq.t() @ (xfp - xq) / xq.shape[0])
    assert cross["self_attn.q_proj"] is cross["self_attn.k_proj"] is cross["self_attn.v_proj"]
    assert cross["mlp.gate_proj"] is cross["mlp.up_proj"]
    torch.testing.assert_close(out, want_out)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k


def _quantized_error(model, bits: int, **opts) -> tuple[float, torch.nn.Module]:
    x = token_batches(4, seed=9)
    with torch.no_grad():
        ref = [model(t).logits for t in x]
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(q, token_batches(16, seq=64), group_size=32, bits=bits, progress=False, verbose=False,
                        sequential=True, **opts)
    with torch.no_grad():
        err = sum(float(((q(t).logits - r) ** 2).mean()) for t, r in zip(x, ref, strict=True))
    return err, q


def test_fp_targets_change_later_blocks_only():
    """Block 0 sees the same input in both streams: its codes are unchanged; later blocks'
    change (their input carries block 0's quantization error)."""
    model = tiny_model("llama", layers=3)
    _, plain = _quantized_error(model, 3)
    _, fpt = _quantized_error(model, 3, fp_targets=True)
    sd_plain, sd_fpt = plain.state_dict(), fpt.state_dict()
    first = [k for k in sd_plain if k.startswith("model.layers.0.") and k.endswith("weight")]
    later = [k for k in sd_plain if k.startswith("model.layers.2.") and "proj" in k]
    assert first and later
    for k in first:
        torch.testing.assert_close(sd_fpt[k].dequantize() if hasattr(sd_fpt[k], "dequantize") else sd_fpt[k],
                                   sd_plain[k].dequantize() if hasattr(sd_plain[k], "dequantize") else sd_plain[k])
    assert any(not torch.equal(sd_fpt[k].dequantize(), sd_plain[k].dequantize()) for k in later
               if hasattr(sd_plain[k], "dequantize"))


def test_fp_targets_need_gptq_rounding():
    """The correction lives in the error-feedback step: with rounding='nearest' it is refused."""
    with pytest.raises(ValueError, match="fp_targets"):
        awq_config(fp_targets=True, rounding="nearest")
    with pytest.raises(ValueError, match="fp_targets"):
        awq_config(fp_targets="yes")
