"""channel_stats="sample": the candidate scales' mean |x| from the search sample's own inputs,
and awq_ao.quantize recording the calibration batches without running the model on them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batches
from torchao.quantization import quantize_

import awq_ao
from awq_ao import api
from awq_ao.passes import search as search_mod

OPTS = dict(group_size=32, verbose=False, progress=False)


def _logits(model, seed: int = 7) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batches(1, seed=seed)[0]).logits


def _count_block_calls(model) -> list[int]:
    calls = [0]
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("sequential", [True, False])
def test_quantize_records_without_running_the_model(sequential: bool, monkeypatch) -> None:
    """The calibration loop only records (no block runs); the model equals the plugin flow's,
    where the user's loop runs every batch through the float model: the statistics come from
    the sample alone."""
    a, b = (tiny_model("llama", layers=2) for _ in range(2))  # seeded: the same weights
    calib = token_batches(3)
    calls = _count_block_calls(a)
    at_convert: list[int] = []
    real_quantize_ = api.quantize_

    def spy(model, config, **kw):
        if config.step == "convert":
            at_convert.append(calls[0])  # block calls so far: the calibration loop's
        return real_quantize_(model, config, **kw)

    monkeypatch.setattr(api, "quantize_", spy)
    rep = awq_ao.quantize(a, calib, channel_stats="sample", sequential=sequential, **OPTS)
    assert at_convert == [0]
    assert calls[0] > 0  # the search did run the blocks
    assert rep.times["calibration loop (before convert)"] >= 0
    assert len(rep.quantized) == 14
    quantize_(b, awq_ao.awq_config(step="prepare", channel_stats="sample", sequential=sequential, **OPTS),
              filter_fn=awq_ao.whole_model)
    with torch.no_grad():
        for x in calib:
            b(x)
    quantize_(b, awq_ao.awq_config(channel_stats="sample", sequential=sequential, **OPTS), filter_fn=awq_ao.whole_model)
    assert torch.equal(_logits(a), _logits(b))
    assert all(r.alpha is not None for r in rep.groups), [r.note for r in rep.groups]  # every group scaled
    with torch.no_grad():  # and the prepared-then-converted model runs normally
        a(calib[0])


def test_statistics_come_from_the_kept_sample_only() -> None:
    """Batches past the kept sample (``max_gram_samples`` rows) change the default's statistics,
    not channel_stats="sample"'s; the default does read them."""
    base = token_batches(2, seed=1)
    extra = token_batches(2, seed=9)
    runs = {}
    for stats in ("sample", "calibration"):
        for name, calib in (("short", base), ("long", base + extra)):
            m = tiny_model("llama", layers=1)
            awq_ao.quantize(m, calib, channel_stats=stats, max_gram_samples=4, max_search_samples=4, **OPTS)
            runs[stats, name] = _logits(m)
    assert torch.equal(runs["sample", "short"], runs["sample", "long"])
    assert not torch.equal(runs["calibration", "short"], runs["calibration", "long"])


def test_sample_mean_is_the_consumers_input_mean(monkeypatch) -> None:
    """Every searched group's mean |x| (what the candidate scales are built from) is its first
    consumer's input's float64 mean over the search rows."""
    model = tiny_model("llama", layers=1)
    inputs: dict[str, torch.Tensor] = {}
    used: dict[str, torch.Tensor | None] = {}
    orig_mean, orig_x_mean = search_mod._sample_mean_abs, search_mod.ScaleSearch._x_mean

    def spy_mean(x: torch.Tensor, name: str) -> torch.Tensor:
        inputs.setdefault(name, x.detach().clone())
        return orig_mean(x, name)

    def spy_x_mean(self, g, x):
        out = orig_x_mean(self, g, x)
        used[self.prefix + g.consumers[0]] = out
        return out

    monkeypatch.setattr(search_mod, "_sample_mean_abs", spy_mean)
    monkeypatch.setattr(search_mod.ScaleSearch, "_x_mean", spy_x_mean)
    awq_ao.quantize(model, token_batches(2), channel_stats="sample", **OPTS)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"} <= set(used)
    for name, got in used.items():
        x = inputs[name]
        ref = x.double().abs().reshape(-1, x.shape[-1]).mean(0)
        assert got is not None
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_loop_error_leaves_the_model_runnable() -> None:
    """A calibration iterable that fails mid-loop must not leave the record-only switch on."""
    model = tiny_model("llama", layers=1)
    batches = token_batches(2)

    def failing():
        yield batches[0]
        raise RuntimeError("dataset broke")

    with pytest.raises(RuntimeError, match="dataset broke"):
        awq_ao.quantize(model, failing(), channel_stats="sample", **OPTS)
    with torch.no_grad():
        model(batches[1])  # no CallRecorded escapes


def test_nonfinite_sample_input_names_the_layer() -> None:
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        awq_ao.quantize(model, token_batches(2), channel_stats="sample", **OPTS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not torch.isnan(before[k]).any())


def test_bad_channel_stats_value() -> None:
    with pytest.raises(ValueError, match="'sample'"):
        awq_ao.awq_config(channel_stats="observers")
