"""The architecture sweep (devtools.arch_sweep) on a few families, and in full (slow)."""

from __future__ import annotations

import pytest

from devtools.arch_sweep import (
    FOLD_TOL,
    coverage,
    discover,
    render_markdown,
    summary_counts,
    sweep,
)

# dense pre-norm, GPT-2 Conv1D + GELU-tanh, parallel attention/MLP block with partial rotary,
# Gemma (1 + w) norms, and a transformers-5 MoE (3-D expert weights, router + norm fallback)
FAST = [
    "LlamaForCausalLM",
    "GPT2LMHeadModel",
    "PhiForCausalLM",
    "GemmaForCausalLM",
    "Qwen3MoeForCausalLM",
]


def test_discover_classifies_classes():
    cands = {c.name: c for c in discover()}
    assert not cands["LlamaForCausalLM"].skip
    assert "encoder-decoder" in cands["BartForCausalLM"].skip
    assert "BERT-style" in cands["BertLMHeadModel"].skip
    assert "multimodal" in cands["Gemma3ForConditionalGeneration"].skip


def test_sweep_fast_families():
    results = sweep(FAST, compile_names=(), isolate=False)
    by = {r.name: r for r in results}
    for name in FAST:
        r = by[name]
        assert r.status == "ok", (name, r.stage, r.reason)
        assert r.exported and r.eager_ok
        assert r.fold_err is not None and r.fold_err < FOLD_TOL, (name, r.fold_err)
        assert r.folded > 0 and r.quantized > 0
    # 2 layers: per layer a norm group (q, k, v) and a v -> o group at least
    assert by["LlamaForCausalLM"].groups == {"norm": 4, "linear": 4}
    assert by["LlamaForCausalLM"].fallback_multiplies == 0
    # GPT-2's GELU-tanh (written out with pow) before c_proj cannot fold
    assert by["GPT2LMHeadModel"].groups.get("fallback") == 2
    # MoE experts are 3-D parameters following transformers' experts protocol: quantized
    assert by["Qwen3MoeForCausalLM"].expert_params_unquantized == 0
    ok, n = summary_counts(results)
    assert (ok, n) == (len(FAST), len(FAST))
    meta = {"command": "pytest", "date": "-", "transformers": "-", "torch": "-", "machine": "-"}
    md = render_markdown(results, meta)
    assert f"{len(FAST)} of {len(FAST)} decoder-only architectures succeed" in md
    # every linear but the head quantized: full coverage, none listed as partial
    assert all(coverage(r)[0] and r.kept == [] for r in results), [(r.name, r.kept) for r in results]
    assert f"**{len(FAST)} quantize every linear but the output head**, 0 keep more" in md


def test_partial_coverage_is_reported():
    """A success that keeps linears in full precision beyond the head is listed as partial."""
    from devtools.arch_sweep import ArchResult

    r = ArchResult("FakeForCausalLM", status="ok", quantized=2, linears=5, kept=["a.w", "b.w"],
                   kept_reasons=["a.w: its weight is also read directly (aten.t); kept in full precision"])
    full, why = coverage(r)
    assert not full and why == "2 of 4 linears kept in full precision"
    meta = {"command": "pytest", "date": "-", "transformers": "-", "torch": "-", "machine": "-"}
    md = render_markdown([r], meta)
    assert "| FakeForCausalLM | partial (2/4) |" in md
    assert "- **FakeForCausalLM**: 2 of 4 linears kept in full precision (a.w, b.w). a.w: its weight" in md
    assert "**0 quantize every linear but the output head**, 1 keep more" in md


@pytest.mark.slow
def test_sweep_all_architectures():
    results = sweep(timeout=600)
    ok, n = summary_counts(results)
    failures = [(r.name, r.stage, r.reason) for r in results if r.status not in ("ok", "skipped")]
    assert n >= 100
    assert ok >= 0.9 * n, failures


def test_default_depth_variant_keeps_layer_structure_and_tiny_widths():
    from devtools.tiny_configs import with_default_depth

    d = {"num_hidden_layers": 12, "n_input_layers": 2, "layer_types": ["a"] * 12, "hidden_size": 1024}
    out = {"num_hidden_layers": 2, "n_input_layers": 1, "layer_types": ["a"] * 2, "hidden_size": 64}
    assert with_default_depth(d, out) == {**d, "hidden_size": 64}
    assert with_default_depth(d, {**d, "hidden_size": 64}) is None
