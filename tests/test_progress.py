"""awq_ao.progress: one bar over calibration, search, clip/round/pack and saving."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao import awq_config
from awq_ao.progress import (
    CostModel,
    RunProgress,
    current,
    linear_shapes,
    rows_of,
    run_progress,
    tokens_of,
)


def test_cost_model_follows_the_options():
    base = CostModel(awq_config(), search_tokens=4096)
    assert base.candidates() == 21
    assert CostModel(awq_config(duo_scaling="both"), 4096).candidates() == 41
    # the module loss runs a forward over the tokens per candidate; the Gram form does not
    assert base.search(576, 576) > CostModel(awq_config(search_loss="linear"), 4096).search(576, 576) > 0
    assert CostModel(awq_config(scale_search=False, clip=False), 4096).search(576, 576) == 0
    rtn = CostModel(awq_config(scale_search=False, clip=False), 0).round(576, 576)
    assert 0 < rtn < CostModel(awq_config(rounding="nearest"), 0).round(576, 576) < base.round(576, 576)
    assert base.calibrate(10, 20, 100) == pytest.approx(2 * base.calibrate(10, 20, 50))


def test_run_progress_counts_each_linear_once_and_never_past_the_plan():
    run = RunProgress(enabled=False)
    run.plan("calibrate", 10.0)
    run.plan("calibrate", 99.0)  # a second plan of a phase is ignored
    run.plan_linears("search", {"a": 20.0, "b": 10.0})
    assert run.totals == {"calibrate": 10.0, "search": 30.0}
    run.advance("calibrate", 25.0)  # clamped at the plan
    assert run.fraction() == pytest.approx(0.25)
    run.linear_done("search", "a")
    run.linear_done("search", "a")
    assert run.fraction() == pytest.approx(0.75)
    run.linear_done("search", "unknown")  # not planned: costs nothing
    run.advance("save", 5.0)  # not planned: ignored
    run.finish("search")
    assert run.fraction() == pytest.approx(1.0)
    fractions = [f for _, f, _ in run.timeline]
    assert fractions == sorted(fractions)


def test_run_progress_nests():
    assert current() is None
    with run_progress(False) as (outer, owned):
        assert owned and current() is outer
        with run_progress(True) as (inner, owned_inner):
            assert inner is outer and not owned_inner
    assert current() is None


def test_batch_tokens_and_rows():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert (tokens_of(ids), rows_of(ids)) == (21, 3)
    assert tokens_of({"input_ids": ids, "attention_mask": ids}) == 21
    assert tokens_of((ids,)) == 21
    assert tokens_of(torch.zeros(3, 7, 16)) == 21  # embeddings: the hidden dimension is not tokens


def test_linear_shapes_reads_conv1d_as_out_in():
    model = tiny_model("gpt2", layers=1)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    shapes = linear_shapes(model, names)
    c_fc = next(n for n in names if n.endswith("c_fc"))
    assert shapes[c_fc] == (model.config.n_inner or 4 * model.config.n_embd, model.config.n_embd)


@pytest.mark.parametrize("sequential", [True, False])
def test_one_bar_covers_calibration_search_and_rounding(monkeypatch, sequential):
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def counting(*a, **kw):
        bars.append(kw.get("desc"))
        return real(*a, **kw)

    monkeypatch.setattr(tqdm.auto, "tqdm", counting)
    model = tiny_model("llama", layers=2)
    with run_progress(True) as (run, _):
        report = awq_ao.quantize(model, token_batches(4), group_size=32, n_grid=3, verbose=False, sequential=sequential)
    assert bars == ["awq_ao"]  # no bar of its own for the search, the rounding or a block
    assert set(run.totals) == {"calibrate", "search", "round"}
    assert run.fraction() == pytest.approx(1.0)
    fractions = [f for _, f, _ in run.timeline]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    order = []
    for _, _, phase in run.timeline:
        if phase and (not order or order[-1] != phase):
            order.append(phase)
    assert order[0] == "calibrate" and order[-1] == "round" and "search" in order
    # every quantized linear was counted in both phases
    assert run._counted["round"] == set(report.quantized)
    assert run._counted["search"] and run._counted["search"] <= set(report.quantized)
    assert run.done["calibrate"] == pytest.approx(run.totals["calibrate"])


def test_refining_run_plans_and_counts_the_block_refinement():
    model = tiny_model("llama", layers=2)
    with run_progress(False) as (run, _):
        report = awq_ao.quantize(model, token_batches(4), bits=3, group_size=32, n_grid=3, verbose=False,
                                 block_refine_steps=32)
    assert len(report.block_refine) == 2
    assert set(run.totals) == {"calibrate", "search", "round", "refine"}
    assert run._counted["refine"] == set(report.quantized)
    assert run.fraction() == pytest.approx(1.0)
    phases = [p for _, _, p in run.timeline]
    assert phases.index("refine") > phases.index("round")
    # 32 steps of 4 rows, and two passes over the sample: well above one calibration forward
    assert run.totals["refine"] > 3 * run.totals["calibrate"]


def test_plain_quantize_flow_owns_its_run():
    from torchao.quantization import quantize_

    model = tiny_model("llama", layers=1)
    quantize_(model, awq_config(step="prepare", group_size=32, n_grid=2, verbose=False), filter_fn=awq_ao.whole_model)
    for b in token_batches(2):
        model(b)
    quantize_(model, awq_config(group_size=32, n_grid=2, verbose=False, progress=False), filter_fn=awq_ao.whole_model)
    assert current() is None  # the run convert opened is closed again


def test_cli_quantize_shows_one_bar_through_saving(model_dir, text_file, tmp_path, capsys):
    from awq_ao.cli import main

    rc = main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--group-size", "32", "--calib",
               str(text_file), "--n-samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    frames = err.replace("\r", "\n")
    assert "awq_ao:" in frames and "saving" in frames and "calibrating" in frames
    assert "awq search" not in frames and "awq quantize" not in frames
