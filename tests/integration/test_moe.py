"""MoE experts (transformers' ``use_experts_implementation`` modules) quantized to INT4."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models import VOCAB, batches, tiny_moe

import awq_ao
from awq_ao import awq_config, whole_model
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.swap import model_size_bytes
from awq_ao.observers.activation import RecordedCall
from awq_ao.passes.apply import fold_scales
from awq_ao.passes.capture import capture
from awq_ao.passes.experts import is_experts_module, plan_experts
from awq_ao.passes.experts_apply import experts_scales, fold_experts, quantize_experts
from awq_ao.passes.fold import Transaction
from awq_ao.passes.groups import find_groups
from awq_ao.passes.search import GroupResult
from awq_ao.report import ConvertReport
from awq_ao.state import get_state

# gpt_oss: is_transposed, has_bias, interleaved gate/up with a custom (non-linear) gate
FAMILIES = [
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "GptOssForCausalLM",
]


def _is_experts(p: object) -> bool:
    return isinstance(p, Int4WeightTensor) and p.dim() == 3


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def tol64(name: str) -> float:
    """Relative tolerance of float64 comparisons (NemotronH's mamba mixer computes parts in float32)."""
    return 1e-6 if "Nemotron" in name else 1e-11


TEST_IDS = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))


# --- (i) the grouped INT4 path ----------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    e=st.integers(1, 5),
    n=st.sampled_from([16, 32, 48]),
    k=st.sampled_from([24, 32, 64, 80]),
    gs=st.sampled_from([16, 32, -1]),
    transposed=st.booleans(),
    rows=st.integers(0, 12),
    seed=st.integers(0, 1000),
)
def test_grouped_int4_roundtrip_and_linear(e, n, k, gs, transposed, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g, dtype=torch.float64)
    logical = w.transpose(1, 2).contiguous() if transposed else w
    q = Int4WeightTensor.from_float(logical, 4, gs, True, transposed=transposed)
    assert q.shape == logical.shape
    deq = q.dequantize()
    for i in range(e):  # same codes/scales as the 2-D tensor, one slab per expert
        ref = Int4WeightTensor.from_float(w[i], 4, gs, True).dequantize()
        slab = deq[i].t() if transposed else deq[i]
        torch.testing.assert_close(slab, ref, rtol=0, atol=0)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, e + 1, (rows,), generator=g)  # -1 and e: sentinels -> zeros
    y = q.grouped_linear(x, ids)
    w_rows = deq.transpose(1, 2) if transposed else deq
    for r in range(rows):
        want = x[r] @ w_rows[ids[r]].t() if 0 <= ids[r] < e else torch.zeros(n, dtype=torch.float64)
        torch.testing.assert_close(y[r], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES + ["NemotronHForCausalLM"])
def test_int4_experts_forward_matches_dequantized_reference(name):
    """The INT4 experts implementation equals the model's own (eager) experts forward run on
    the dequantized weights, in float64."""
    model = tiny_moe(name, torch.float64)  # RTN experts (float64 linears are not quantizable)
    cfg = awq_config(scale_search=False, clip=False, group_size=32)
    quantize_experts(model, None, {}, {}, {}, cfg, Transaction(), ConvertReport(4, 32, True))
    mods = experts_modules(model)
    assert mods and all(m.config._experts_implementation == IMPLEMENTATION for m in mods)
    out = logits(model, TEST_IDS)
    for m in mods:  # back to float weights with the model's eager implementation
        for attr in ("gate_up_proj", "up_proj", "down_proj"):
            p = getattr(m, attr, None)
            if _is_experts(p):
                setattr(m, attr, torch.nn.Parameter(p.dequantize(), requires_grad=False))
        m.config._experts_implementation_internal = "eager"  # the module's own config copy
    ref = logits(model, TEST_IDS)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < tol64(name), err


def test_int4_experts_compile_fullgraph():
    model = tiny_moe("MixtralForCausalLM")
    awq_ao.quantize(model, batches(2), group_size=32, n_grid=4, progress=False, verbose=False)
    eager = logits(model, TEST_IDS)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(TEST_IDS, use_cache=False).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


# --- (ii) folding the scales alone is exact ----------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES + ["NemotronHForCausalLM"])
def test_fold_random_scales_is_exact(name):
    # the graph is captured in float32 (the eager float64 experts loop does not export)
    model = tiny_moe(name)
    cfg = awq_config(group_size=32, progress=False, verbose=False)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    ep = capture(model, RecordedCall((batches(1)[0]["input_ids"][:1],), {"use_cache": False}, 1))
    analysis = find_groups(ep, model, targets)
    added = plan_experts(ep, model, analysis, targets, cfg)
    model = model.double()
    model.set_experts_implementation("eager")
    ref = logits(model, TEST_IDS)
    inputs = [g for g in added if g.slabs[0].index is None]
    assert len(inputs) == len(analysis.experts)  # every MoE block input folds
    pairs = sum(info.num_experts for info in analysis.experts.values() if info.up_index is not None)
    assert len(added) == len(inputs) + pairs  # and every expert's up -> down pair where the gate allows
    gen = torch.Generator().manual_seed(1)
    txn = Transaction()
    results = {gi: GroupResult(torch.rand(g.in_features, generator=gen, dtype=torch.float64) + 0.5, 0.5)
               for gi, g in enumerate(analysis.groups) if g.slabs}
    fold_scales(model, analysis, results, cfg, txn, ConvertReport(4, 32, True))
    for name_, sc in experts_scales(analysis, results).items():
        fold_experts(model.get_submodule(name_), analysis.experts[name_], sc, txn)
    out = logits(model, TEST_IDS)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < tol64(name), err
    txn.rollback()
    torch.testing.assert_close(logits(model, TEST_IDS), ref, rtol=0, atol=0)


# --- (iii) convert: INT4 experts, smaller model, output close to FP ----------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_quantizes_experts(name):
    model = tiny_moe(name)
    ref = logits(model, TEST_IDS)
    n_expert_params = sum(p.numel() for m in experts_modules(model) for n, p in m.named_parameters() if p.dim() == 3)
    quantize_(model, batches())
    report = get_state(model).report
    mods = experts_modules(model)
    for m in mods:
        for attr in ("gate_up_proj", "down_proj"):
            assert _is_experts(getattr(m, attr))
    assert len(report.experts_quantized) == 2 * len(mods)
    # 4-bit codes + per-group fp32 scale/zero: at least 4x smaller than fp32 expert weights
    saved = report.size_before - report.size_after
    assert saved > n_expert_params * 4 * (1 - 1 / 4)
    assert model_size_bytes(model) == report.size_after
    out = logits(model, TEST_IDS)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert torch.isfinite(out).all() and err < 0.3, err
    assert "MoE experts" in report.summary()


def quantize_(model: torch.nn.Module, calib: list[dict], **kw) -> None:
    from torchao.quantization import quantize_ as tq

    opts = dict(group_size=32, n_grid=5, progress=False, verbose=False, **kw)
    tq(model, awq_config(step="prepare", **opts), filter_fn=whole_model)
    with torch.no_grad():
        for b in calib:
            model(**b)
    tq(model, awq_config(**opts), filter_fn=whole_model)


def test_awq_experts_beat_rtn_experts():
    """Search + clipping of the experts lowers the output error against RTN experts."""
    errs = {}
    for scale_search in (False, True):
        model = tiny_moe("Qwen3MoeForCausalLM")
        ref = logits(model, TEST_IDS)
        quantize_(model, batches(), include=("*experts*", "*o_proj"), scale_search=scale_search, clip=scale_search)
        errs[scale_search] = float((logits(model, TEST_IDS) - ref).pow(2).mean())
    assert errs[True] < errs[False], errs


def test_sequential_mode_and_experts_off():
    model = tiny_moe("Qwen2MoeForCausalLM")
    ref = logits(model, TEST_IDS)
    quantize_(model, batches(), sequential=True)
    assert all(_is_experts(m.down_proj) for m in experts_modules(model))
    err = float((logits(model, TEST_IDS) - ref).abs().max() / ref.abs().max())
    assert err < 0.3, err
    model = tiny_moe("MixtralForCausalLM")
    quantize_(model, batches(1), experts=False)
    assert get_state(model).report.experts_quantized == []
    assert all(not _is_experts(m.down_proj) for m in experts_modules(model))


# --- (iv) experts without calibration tokens ----------------------------------------------------


def test_expert_without_tokens_is_reported():
    model = tiny_moe("GptOssForCausalLM")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("router.bias"):
                p[3] = -1e4  # expert 3 is never routed to
    ref = logits(model, TEST_IDS)
    with pytest.warns(UserWarning, match="received no calibration tokens"):
        quantize_(model, batches())
    report = get_state(model).report
    n_layers = len(experts_modules(model))
    assert report.experts_no_tokens >= n_layers
    assert f"{report.experts_no_tokens} experts received no calibration tokens" in report.summary()
    out = logits(model, TEST_IDS)
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.3


# --- (v) a failing convert leaves the model exactly as it was -----------------------------------


def test_convert_failure_restores_model(monkeypatch):
    model = tiny_moe("Qwen2MoeForCausalLM")
    ref = logits(model, TEST_IDS)
    opts = dict(group_size=32, n_grid=3, progress=False, verbose=False)
    from torchao.quantization import quantize_ as tq

    tq(model, awq_config(step="prepare", **opts), filter_fn=whole_model)
    with torch.no_grad():
        for b in batches(2):
            model(**b)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    configs = [m.config for m in experts_modules(model)]
    calls = {"n": 0}
    real = Int4WeightTensor.from_slabs.__func__  # every expert weight is built through it

    def flaky(cls, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the second experts module, after the first was quantized
            raise RuntimeError("boom")
        return real(cls, *a, **kw)

    monkeypatch.setattr(Int4WeightTensor, "from_slabs", classmethod(flaky))
    with pytest.raises(RuntimeError, match="boom"):
        tq(model, awq_config(**opts), filter_fn=whole_model)
    assert calls["n"] == 3
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for n, p in before.items():
        assert type(after[n].data) is torch.Tensor and torch.equal(after[n], p), n
    assert [m.config for m in experts_modules(model)] == configs
    assert get_state(model).phase == "prepared"
    monkeypatch.undo()
    torch.testing.assert_close(logits(model, TEST_IDS), ref, rtol=0, atol=0)


# --- (vi) checkpoints: INT4 experts survive save_quantized -> load_quantized ---------------------


def _expert_params(model: torch.nn.Module) -> dict[str, Int4WeightTensor]:
    return {n: p for n, p in model.named_parameters() if _is_experts(p)}


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_checkpoint_roundtrip_int4_experts(name, tmp_path, capsys):
    import json

    from awq_ao.checkpoint import checkpoint_summary, load_quantized, save_quantized
    from awq_ao.cli import main

    model = tiny_moe(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experts without calibration tokens (gpt-oss)
        awq_ao.quantize(model, batches(2), group_size=32, n_grid=3, progress=False, verbose=False)
    before = _expert_params(model)
    assert before
    out = save_quantized(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3
    assert sorted(qc["quantized_experts"]) == sorted(before)
    assert all(v["transposed"] == (name == "GptOssForCausalLM") for v in qc["quantized_experts"].values())

    loaded = load_quantized(out)
    after = _expert_params(loaded)
    assert after.keys() == before.keys()
    for n, w in before.items():
        v = after[n]
        assert (v.shape, v.dtype, v.bits, v.group_size, v.transposed) == (w.shape, w.dtype, w.bits, w.group_size, w.transposed), n
        assert torch.equal(v.dequantize(), w.dequantize()), n
    mods = experts_modules(loaded)
    assert mods and all(m.config._experts_implementation == IMPLEMENTATION for m in mods)
    assert loaded.config._experts_implementation != IMPLEMENTATION  # only the experts' config copies
    assert {type(p) for p in loaded.parameters()} == {type(p) for p in model.parameters()}
    torch.testing.assert_close(logits(loaded, TEST_IDS), logits(model, TEST_IDS), rtol=0, atol=0)

    s = checkpoint_summary(out)
    assert s["num_quantized_experts"] == len(before) and s["quantized_experts"] == sorted(before)
    assert main(["info", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    assert f"MoE experts:    {len(before)} INT4" in text and f"{next(iter(before))}  [experts]" in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_quantized_experts"] == len(before)


def test_checkpoint_int4_experts_dtype_override_and_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    from awq_ao.checkpoint import CheckpointError, load_quantized, save_quantized

    model = tiny_moe("Qwen3MoeForCausalLM")
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, progress=False, verbose=False)
    out = save_quantized(model, tmp_path / "ckpt")
    bf = load_quantized(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in _expert_params(bf).values())
    torch.testing.assert_close(logits(bf, TEST_IDS).float(), logits(model, TEST_IDS), atol=0.3, rtol=0.1)

    key = sorted(_expert_params(model))[0]
    f = out / "model.safetensors"
    (out / "awq_ao_manifest.json").unlink()  # rewritten as another tool would: the reader's own checks answer
    tensors = load_file(f)
    tensors[f"{key}_scale"] = tensors[f"{key}_scale"][:, :-1].contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}_scale.* has shape"):
        load_quantized(out)
    del tensors[f"{key}_scale"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}_scale.* is missing"):
        load_quantized(out)


@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_export_formats_refuse_int4_experts(fmt, tmp_path):
    from awq_ao.checkpoint import CheckpointError, save_quantized

    model = tiny_moe("MixtralForCausalLM")
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, progress=False, verbose=False)
    with pytest.raises(CheckpointError, match=rf"the {fmt} format cannot hold INT4 MoE experts.*model\.layers\.0\.mlp\.experts\.down_proj.*format='awq_ao'"):
        save_quantized(model, tmp_path / "ckpt", format=fmt)
    assert not (tmp_path / "ckpt").exists()


def test_cli_refuses_export_formats_for_moe_before_quantizing():
    from awq_ao.cli.inputs import CLIError, precheck_format

    model = tiny_moe("MixtralForCausalLM")
    for fmt in ("autoawq", "compressed-tensors"):
        with pytest.raises(CLIError, match=rf"--format {fmt} cannot hold INT4 MoE experts \(model\.layers\.0\.mlp\.experts.*use --format awq_ao"):
            precheck_format(model, fmt, 4, 32)
    precheck_format(model, "awq_ao", 4, 32)


def test_unpickled_experts_weight_registers_its_implementation(tmp_path):
    """A pickled 3-D weight loaded in a fresh process that has transformers registers the
    "awq_ao_int4" experts implementation (its module's forward dispatches to it)."""
    import subprocess
    import sys

    path = tmp_path / "w.pt"
    torch.save(Int4WeightTensor.from_float(torch.randn(2, 16, 64), 4, 32), path)
    code = (
        "import sys, torch, transformers\n"
        "from transformers.integrations.moe import ExpertsInterface\n"
        "import awq_ao.lowering\n"
        "assert 'awq_ao.lowering.int4_experts' not in sys.modules\n"
        f"w = torch.load({str(path)!r})\n"
        "print(w.dim(), 'awq_ao_int4' in ExpertsInterface._global_mapping)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["3", "True"]


def test_search_refine_applies_to_experts(monkeypatch):
    """search_refine=True searches the experts' scales (the MoE input group and every expert's
    up -> down pair) on the refined grid too: fewer candidates, the same grid otherwise."""
    from awq_ao.passes import search as search_pass

    calls: list[tuple[bool, int]] = []
    real = search_pass.grid_search

    def counting(loss_of, best, x_mean, w_mean, n_grid, duo, tie=None, refine=False):
        n = [0]

        def counted(s):
            n[0] += 1
            return loss_of(s)

        out = real(counted, best, x_mean, w_mean, n_grid, duo, tie, refine=refine)
        calls.append((refine, n[0]))
        return out

    monkeypatch.setattr(search_pass, "grid_search", counting)
    seen = {}
    for refine in (False, True):
        calls.clear()
        model = tiny_moe("MixtralForCausalLM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # search_rounding="nearest": the dense Gram-scored groups go through grid_search too
            # (with "gptq" they are scored by rounded_candidates.direct_rounded_search)
            report = awq_ao.quantize(model, batches(3), group_size=32, n_grid=10, search_refine=refine,
                                     screen_rows=None, search_rounding="nearest", progress=False, verbose=False)
        seen[refine] = list(calls)
        dense = sum(1 for g in report.groups if g.kind != "experts" and not any("experts" in c for c in g.consumers))
    n_layers = tiny_moe("MixtralForCausalLM").config.num_hidden_layers
    n_experts = tiny_moe("MixtralForCausalLM").config.num_local_experts
    for refine, want in ((False, 10), (True, 7)):  # refine at n_grid=10: 5 coarse + 2 neighbours at most
        # the dense groups, and per layer the MoE input group and each expert's up -> down pair
        assert len(seen[refine]) == dense + n_layers * (1 + n_experts)
        assert all(r is refine for r, _ in seen[refine])
        assert all(n == want for _, n in seen[refine]) if not refine else all(6 <= n <= want for _, n in seen[refine])


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "GptOssForCausalLM"])
def test_rounding_option_applies_to_experts(name):
    """rounding='gptq' rounds expert weights with error feedback (it used to be ignored for
    experts); 'nearest' keeps round-to-nearest; the report says which."""
    weights, notes, counts = {}, {}, {}
    for rounding in ("nearest", "gptq"):
        model = tiny_moe(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = awq_ao.quantize(model, batches(3), group_size=32, n_grid=3, progress=False, verbose=False, rounding=rounding)
        weights[rounding] = {k: v.dequantize() for k, v in _expert_params(model).items()}
        notes[rounding] = [g.note for g in report.groups if g.kind == "experts" or "rounded with" in g.note]
        counts[rounding] = report.error_feedback
    assert weights["gptq"].keys() == weights["nearest"].keys() and weights["gptq"]
    assert any(not torch.equal(weights["gptq"][k], weights["nearest"][k]) for k in weights["gptq"])
    assert notes["gptq"] and all("rounded with error feedback (gptq)" in n for n in notes["gptq"])
    assert notes["nearest"] and all("rounded with nearest" in n for n in notes["nearest"])
    n_experts = sum(p.shape[0] for p in weights["gptq"].values())
    assert counts["gptq"] - counts["nearest"] >= n_experts  # every expert slab counted
