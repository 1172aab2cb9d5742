"""Architecture sweep: every decoder-only ``*ForCausalLM`` of transformers through awq_ao.

Run::

    python -m devtools.arch_sweep [--only NAME ...] [--out docs/architectures.md]
        [--json benchmarks/results/arch_sweep.json] [--compile] [--timeout 300]

For every causal-LM class the installed transformers exports, the sweep builds a tiny random
model from the class's own config defaults (:mod:`devtools.tiny_configs`), randomises
its 1-D parameters (norm weights are ones at init, which would hide fold bugs), and runs:

1. a fold check: export, find scale groups, fold random scales into every foldable group of
   a float64 copy, and compare the output with the unfolded model (relative to its
   magnitude; exact folds give float rounding only). Where ``torch.export`` fails, the
   groups come from awq_ao's hook-only analysis and the flow below runs with
   ``on_capture_error="hook_only"`` (the export error is recorded);
2. awq_ao's flow (prepare -> 2 calibration batches -> convert) with ``n_grid=4`` and
   ``group_size=32``, recording the scale groups by producer kind, folds and fallbacks;
3. the INT4 model in eager mode, and under ``torch.compile`` for a few representative
   architectures (all of them with ``--compile``).

Classes that are not decoder-only (encoder-decoder halves, BERT-style encoders, multimodal
models) are listed as skipped; classes whose own default config does not build a model
(so no tiny config can be derived from it) are listed as untestable. Every architecture
runs in a worker process with a timeout, so one crash or hang cannot stop the sweep. No
per-model code: classes are enumerated, configs are derived generically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SEQ = 16
BATCH = 2
GROUP_SIZE = 32
N_GRID = 4
# Pass threshold of the fold check (max error relative to the output magnitude). Random
# scales lie in [0.25, 4]: a wrong fold changes the output by 0.1-1; exact folds leave float
# rounding only (< 1e-5 here, also for models that compute norms in float32 inside).
FOLD_TOL = 1e-4
DEFAULT_TIMEOUT = 300.0
# compiled by default (compile is slow on small CPUs): one dense, one GPT-2 style, one MoE
COMPILE_DEFAULT = ("LlamaForCausalLM", "GPT2LMHeadModel", "Qwen3MoeForCausalLM")
DEFAULT_OUT = "docs/architectures.md"
DEFAULT_JSON = "benchmarks/results/arch_sweep.json"

_MULTIMODAL_SUBCONFIG = re.compile(r"vision|audio|speech|image|video|visual")


@dataclass
class Candidate:
    """One causal-LM class and whether the sweep runs it (``skip`` says why not)."""

    name: str
    model_types: list[str]
    skip: str = ""


@dataclass
class ArchResult:
    """What the sweep measured for one architecture."""

    name: str
    model_types: list[str] = field(default_factory=list)
    # "ok", "fail", "timeout", "skipped" (not decoder-only) or "untestable" (the class's own
    # default config does not build a model, so no tiny config can be derived from it)
    status: str = "fail"
    stage: str = ""  # the step that failed: config, build, forward, export, fold, quantize, eager, compile
    reason: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    exported: bool | None = None
    export_error: str = ""
    groups: dict[str, int] = field(default_factory=dict)
    folded: int = 0
    fallback_groups: int = 0
    fallback_multiplies: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    quantized: int = 0
    linears: int = 0
    #: quantizable linears left in full precision, the output head excepted (None: not recorded)
    kept: list[str] | None = None
    kept_reasons: list[str] = field(default_factory=list)
    layer_by_layer: bool | None = None  # the default sequential="auto" went block by block
    unseen: int = 0
    expert_params_unquantized: int = 0
    fold_err: float | None = None
    fold_dtype: str = ""
    fold_groups: int = 0
    eager_ok: bool | None = None
    eager_rel_err: float | None = None
    compile_ok: bool | None = None
    compile_error: str = ""
    seconds: float = 0.0


# --- discovery ----------------------------------------------------------------------------
def _quiet() -> None:
    """Offline transformers that logs errors only (warnings are silenced per call)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _skip_reason(cls: type) -> str:
    """Why ``cls`` is not a decoder-only language model ("" if it is)."""
    if cls.__name__.endswith("ForConditionalGeneration"):
        return "multimodal (ForConditionalGeneration: needs pixel/audio inputs)"
    cfg_cls = getattr(cls, "config_class", None)
    if cfg_cls is None:
        return "no config class"
    subs = list(getattr(cfg_cls, "sub_configs", None) or {})
    mm = [s for s in subs if _MULTIMODAL_SUBCONFIG.search(s)]
    if mm:
        return f"multimodal (sub-configs {', '.join(mm)})"
    try:
        cfg = cfg_cls()
    except Exception:
        return ""  # decided when the tiny config is built
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder (decoder half of a seq2seq model)"
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "is_decoder" in cfg.to_dict() and not cfg.is_decoder and "encoder_hidden_states" in params:
        return "encoder / cross-attention decoder (is_decoder=False by default; BERT-style)"
    return ""


def discover() -> list[Candidate]:
    """Every causal-LM class exported by the installed transformers, with skip reasons."""
    _quiet()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore", module="transformers")
    types: dict[str, list[str]] = {}
    for mt, cname in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        types.setdefault(cname, []).append(mt)
    names = set(types)
    names |= {n for n in dir(transformers) if n.endswith("ForCausalLM") and not n.startswith(("Auto", "TF", "Flax"))}
    out: list[Candidate] = []
    for n in sorted(names):
        try:
            cls = getattr(transformers, n)
        except Exception as e:  # noqa: BLE001
            out.append(Candidate(n, types.get(n, []), f"not importable: {_first_line(e)}"))
            continue
        out.append(Candidate(n, types.get(n, []), _skip_reason(cls)))
    return out


# --- one architecture ---------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    line = msg.splitlines()[0] if msg else ""
    return f"{type(e).__name__}: {line}"[:300]


def build_tiny(name: str, seed: int = 0) -> Any:
    """The tiny random model of class ``name`` (float32, eval mode, 1-D params randomised).

    Tries the candidates of :func:`devtools.tiny_configs.tiny_configs` in order and
    returns the first model that builds and runs a forward pass; raises the first error.
    """
    import torch
    import transformers

    from devtools.tiny_configs import tiny_configs

    cls = getattr(transformers, name)
    first: BaseException | None = None
    for cfg in tiny_configs(cls):
        try:
            torch.manual_seed(seed)
            model = cls(cfg)
            randomise_vectors(model, seed)
            model = model.float().eval()
            vocab = int(getattr(model.config, "vocab_size", None) or 256)
            _forward(model, _batches(vocab, 1, seed + 100)[0])
            return model
        except Exception as e:  # noqa: BLE001 - the next candidate may work
            first = first or e
    assert first is not None
    raise first


def default_config_builds(name: str) -> tuple[bool, str]:
    """Whether the class's *default* (full-size) config builds a model (on the meta device)."""
    import torch
    import transformers

    cls = getattr(transformers, name)
    try:
        cfg = cls.config_class()
        with torch.device("meta"):
            cls(cfg)
    except Exception as e:  # noqa: BLE001
        return False, _first_line(e)
    return True, ""


def randomise_vectors(model: Any, seed: int = 0) -> None:
    """Perturb every 1-D floating parameter (norm weights/biases) around its initial value."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.2)


def _batches(vocab: int, n: int, seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lo = 3 if vocab > 8 else 0
    return [torch.randint(lo, vocab, (BATCH, SEQ), generator=g) for _ in range(n)]


def _forward(model: Any, ids: Any) -> Any:
    import torch

    from awq_ao.observers.activation import first_tensor
    from awq_ao.passes.capture import call_kwargs

    with torch.no_grad():
        out = model(ids, **call_kwargs(model, {}))
    t = first_tensor(out)
    if t is None:
        raise RuntimeError("the model returned no tensor")
    return t


def _norm_reason(reason: str) -> str:
    """A group's fallback reason without layer numbers (so reasons can be counted)."""
    return re.sub(r"\.\d+\.", ".N.", re.sub(r"_\d+\b", "_N", reason))


def fold_check(model: Any, ids: Any, seed: int = 0) -> tuple[float, str, int, str]:
    """Fold random scales into every foldable group; return (rel. error, dtype, folds, export error).

    Runs on a float64 copy when the model supports it (float32 otherwise). Groups come from
    the exported graph; when ``torch.export`` fails (the error is returned, "" otherwise) they
    come from awq_ao's hook-only analysis (``on_capture_error="hook_only"``).
    """
    import torch

    from awq_ao.observers.activation import RecordedCall
    from awq_ao.observers.attach import is_quantizable, output_head_names
    from awq_ao.passes.capture import CaptureError, call_kwargs, capture
    from awq_ao.passes.fold import Transaction, fold_group
    from awq_ao.passes.groups import find_groups
    from awq_ao.passes.hook_groups import hook_groups

    m = copy.deepcopy(model)
    dtype = torch.float64
    try:
        m = m.to(dtype)
        ref = _forward(m, ids)
        if not torch.isfinite(ref).all():
            raise FloatingPointError("non-finite output in float64")
    except Exception:  # noqa: BLE001 - some models only run in float32
        dtype = torch.float32
        m = copy.deepcopy(model)
        ref = _forward(m, ids)
    heads = output_head_names(m)
    targets = [n for n, mod in m.named_modules() if n and is_quantizable(mod) and n not in heads]
    export_error = ""
    try:
        ep = capture(m, RecordedCall((ids,), {}, int(ids.shape[0])))
    except CaptureError as e:
        export_error = _first_line(e.__cause__ or e)
        analysis = hook_groups(m, targets, (ids,), call_kwargs(m, {}))
    else:
        analysis = find_groups(ep, m, targets)
        del ep
    g = torch.Generator().manual_seed(seed + 1)
    txn = Transaction()
    folded = 0
    for grp in analysis.groups:
        if not grp.foldable or not grp.consumers:
            continue
        s_prod = torch.rand(grp.producer.out_channels, generator=g, dtype=torch.float64) * 3.75 + 0.25
        fold_group(m, grp, s_prod[grp.channel_map], txn)
        folded += 1
    out = _forward(m, ids)
    err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))
    return err, str(dtype).replace("torch.", ""), folded, export_error


def _compile_check(model: Any, ids: Any, eager: Any) -> None:
    import torch

    compiled = torch.compile(model)
    out = _forward(compiled, ids)
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def run_arch(name: str, do_compile: bool = False, seed: int = 0) -> ArchResult:
    """Run the whole check for one class; never raises (failures land in the result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_arch(name, do_compile, seed)


def _run_arch(name: str, do_compile: bool, seed: int) -> ArchResult:
    _quiet()
    import torch

    import awq_ao
    from awq_ao.lowering import Int4WeightTensor
    from awq_ao.observers.attach import accepts_kwarg, is_quantizable
    from devtools.tiny_configs import TinyConfigError

    res = ArchResult(name)
    t0 = time.perf_counter()
    stage = "config"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            stage = "build"
            try:
                model = build_tiny(name, seed)
            except Exception as e:
                ok, why = default_config_builds(name)
                if not ok:
                    res.status = "untestable"
                    res.stage = "config"
                    res.reason = f"the class's default config does not build a model either ({why})"
                    res.seconds = round(time.perf_counter() - t0, 2)
                    return res
                if isinstance(e, TinyConfigError):
                    stage = "config"
                raise
            res.config = _config_summary(model.config)
            res.linears = sum(1 for m in model.modules() if is_quantizable(m))
            vocab = int(getattr(model.config, "vocab_size", None) or 256)
            calib = _batches(vocab, 2, seed)
            if accepts_kwarg(model, "use_cache"):
                # calibrate without a KV cache, as quantization flows do: several hybrid
                # (state-space + attention) models of this transformers fail to build caches
                # for tiny configs, which has nothing to do with quantization
                calib = [{"input_ids": b, "use_cache": False} for b in calib]
            test_ids = _batches(vocab, 1, seed + 100)[0]
            stage = "forward"
            ref = _forward(model, test_ids)
            if not torch.isfinite(ref).all():
                raise FloatingPointError("the float model's output is not finite")
            stage = "fold"
            err, dt, nfold, export_error = fold_check(model, test_ids, seed)
            res.exported = not export_error
            res.export_error = export_error
            res.fold_err, res.fold_dtype, res.fold_groups = err, dt, nfold
            if not err <= FOLD_TOL:
                raise AssertionError(
                    f"folding random scales changed the output: rel. error {err:.2e} > {FOLD_TOL:.0e}"
                )
            stage = "quantize"
            opts: dict[str, Any] = {}
            if export_error:
                # the documented way on for models torch.export cannot capture
                opts["on_capture_error"] = "hook_only"
            report = awq_ao.quantize(
                model, calib, group_size=GROUP_SIZE, n_grid=N_GRID, progress=False, verbose=False, **opts,
            )
            counts = report.kind_counts()
            res.layer_by_layer = report.mode.startswith("layer by layer")
            res.groups = counts
            res.folded = report.folded
            res.fallback_groups = counts.get("fallback", 0)
            res.fallback_multiplies = report.fallback_multiplies
            res.fallback_reasons = dict(
                Counter(_norm_reason(g.note) for g in report.groups if g.kind == "fallback")
            )
            res.quantized = len(report.quantized)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            modules = dict(model.named_modules())
            res.kept = [n for n in report.kept if modules.get(n) is not head]
            res.kept_reasons = list(dict.fromkeys(w for w in report.warnings if "full precision" in w))[:6]
            res.unseen = len(report.unseen)
            res.expert_params_unquantized = sum(
                1 for n, p in model.named_parameters()
                if p.dim() >= 3 and "expert" in n and not isinstance(p, Int4WeightTensor)
            )
            stage = "eager"
            out = _forward(model, test_ids)
            res.eager_ok = bool(torch.isfinite(out).all())
            res.eager_rel_err = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
            if not res.eager_ok:
                raise FloatingPointError("the INT4 model's output is not finite")
            if do_compile:
                stage = "compile"
                try:
                    _compile_check(model, test_ids, out)
                    res.compile_ok = True
                except Exception as e:  # noqa: BLE001
                    res.compile_ok = False
                    res.compile_error = _first_line(e)
                    raise
        res.status = "ok"
        res.stage = ""
    except BaseException as e:  # noqa: BLE001 - recorded, the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        res.status = "fail"
        res.stage = stage
        res.reason = _first_line(e)
        if os.environ.get("AWQ_SWEEP_TRACE"):
            traceback.print_exc()
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def _config_summary(cfg: Any) -> dict[str, Any]:
    keys = (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
    )
    out: dict[str, Any] = {}
    for k in keys:
        try:
            v = getattr(cfg, k)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            out[k] = v
    return out


# --- worker processes ---------------------------------------------------------------------
def _worker(tasks: Any, results: Any, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _quiet()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    sys.stdout = devnull
    sys.stderr = devnull
    while True:
        item = tasks.get()
        if item is None:
            return
        name, do_compile = item
        results.put(asdict(run_arch(name, do_compile)))


class _Pool:
    """One worker process, restarted after a timeout or a crash."""

    def __init__(self, threads: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.threads = threads
        self.proc: Any = None
        self._start()

    def _start(self) -> None:
        self.tasks = self.ctx.Queue()
        self.results = self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker, args=(self.tasks, self.results, self.threads), daemon=True)
        self.proc.start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()  # our own child, by its handle
        if self.proc is not None:
            self.proc.join(10)

    def run(self, name: str, do_compile: bool, timeout: float) -> ArchResult:
        self.tasks.put((name, do_compile))
        t0 = time.perf_counter()
        while True:
            try:
                d = self.results.get(timeout=2.0)
                return ArchResult(**d)
            except queue.Empty:
                pass
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self._kill()
                self._start()
                return ArchResult(name, status="fail", stage="crash", reason=f"worker died (exit code {code})",
                                  seconds=round(time.perf_counter() - t0, 2))
            if time.perf_counter() - t0 > timeout:
                self._kill()
                self._start()
                return ArchResult(name, status="timeout", stage="timeout", reason=f"no result within {timeout:.0f} s",
                                  seconds=round(time.perf_counter() - t0, 2))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tasks.put(None)
            self.proc.join(10)
        self._kill()


def sweep(
    names: list[str] | None = None,
    compile_names: tuple[str, ...] | None = COMPILE_DEFAULT,
    isolate: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    threads: int = 1,
    log: Any = None,
) -> list[ArchResult]:
    """Run the sweep; ``names`` limits it (default: all), ``compile_names=None`` compiles all.

    ``isolate=False`` runs in this process (fast for a few archs; no timeout protection).
    """
    cands = discover()
    by_name = {c.name: c for c in cands}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"not causal-LM classes of this transformers: {missing}")
        cands = [by_name[n] for n in names]
    results: list[ArchResult] = []
    pool = _Pool(threads) if isolate and any(not c.skip for c in cands) else None
    try:
        for i, c in enumerate(cands):
            if c.skip:
                r = ArchResult(c.name, c.model_types, status="skipped", reason=c.skip)
            else:
                do_compile = compile_names is None or c.name in compile_names
                r = pool.run(c.name, do_compile, timeout) if pool is not None else run_arch(c.name, do_compile)
                r.model_types = c.model_types
            results.append(r)
            if log is not None:
                extra = f" [{r.stage}] {r.reason}" if r.status != "ok" else ""
                print(f"[{i + 1}/{len(cands)}] {c.name}: {r.status} ({r.seconds:.1f}s){extra}", file=log, flush=True)
    finally:
        if pool is not None:
            pool.close()
    return results


# --- outputs ------------------------------------------------------------------------------
def summary_counts(results: list[ArchResult]) -> tuple[int, int]:
    """(successes, decoder-only architectures run); skipped and untestable classes excluded."""
    ran = [r for r in results if r.status not in ("skipped", "untestable")]
    return sum(1 for r in ran if r.status == "ok"), len(ran)


def coverage(r: ArchResult) -> tuple[bool, str]:
    """(every quantizable linear but the head quantized and no expert weight left in full
    precision, a short description of what was kept)."""
    kept = len(r.kept) if r.kept is not None else max(0, r.linears - r.quantized - 1)
    parts = []
    if kept:
        parts.append(f"{kept} of {r.linears - 1 if r.kept is None else r.quantized + kept} linears kept in full precision")
    if r.expert_params_unquantized:
        parts.append(f"{r.expert_params_unquantized} expert weights kept in full precision")
    return not parts, "; ".join(parts)


def coverage_counts(results: list[ArchResult]) -> tuple[int, int]:
    """(successes quantizing everything but the head, successes keeping more in full precision)."""
    ok = [r for r in results if r.status == "ok"]
    full = sum(1 for r in ok if coverage(r)[0])
    return full, len(ok) - full


def _fmt_groups(g: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(g.items())) or "-"


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def render_markdown(results: list[ArchResult], meta: dict[str, Any]) -> str:
    """The docs/architectures.md text."""
    ok, n = summary_counts(results)
    full, n_partial = coverage_counts(results)
    untestable = [r for r in results if r.status == "untestable"]
    skipped = [r for r in results if r.status == "skipped"]
    hook_only = [r for r in results if r.status == "ok" and r.exported is False]
    max_fold = max((r.fold_err for r in results if r.fold_err is not None), default=0.0)
    lines = [
        "# Architectures",
        "",
        "<!-- generated file: do not edit by hand -->",
        f"Generated by `{meta['command']}` on {meta['date']} "
        f"(transformers {meta['transformers']}, torch {meta['torch']}, {meta['machine']})"
        + (f"; {len(meta['rerun']['names'])} rows re-run by `{meta['rerun']['command']}` on {meta['rerun']['date']} "
           f"on {meta['rerun']['machine']} ({meta['rerun']['why']})" if meta.get("rerun") else "")
        + (f"; rendered by `{meta['rendered']}`" if meta.get("rendered") else "") + ".",
        "",
        "Every causal-LM class exported by the installed transformers, built as a tiny random model "
        "from its own config defaults (hidden 64, 4 heads of 16, 2-6 layers: the first two of each "
        "layer kind, vocab <= 512, <= 4 experts with top-2 routing), "
        "then: fold random scales into every foldable group of a float64 copy (fold error relative "
        f"to the output magnitude), prepare -> 2 calibration batches -> convert (`n_grid={N_GRID}`, "
        f"`group_size={GROUP_SIZE}`), and run the INT4 model eagerly (and under `torch.compile` "
        "where marked). No architecture has model-specific code in awq_ao.",
        "",
        f"**{ok} of {n} decoder-only architectures succeed with zero per-model code** "
        f"({100.0 * ok / max(n, 1):.1f}%): **{full} quantize every linear but the output head**, "
        f"{n_partial} keep more layers in full precision (*partial*, listed below with counts and "
        f"reasons). Not counted: {len(untestable)} untestable classes whose "
        "own default config does not build a model (so no tiny config can be derived from it; "
        f"counting them as failures: {ok} of {n + len(untestable)}, "
        f"{100.0 * ok / max(n + len(untestable), 1):.1f}%), and {len(skipped)} classes skipped as "
        "not decoder-only or needing extra inputs.",
        "",
        f"{len(hook_only)} of the successes cannot be captured by `torch.export` and run with "
        "`awq_config(on_capture_error=\"hook_only\")` (groups found by hooks, norm folds verified "
        "numerically, no linear-to-linear folds); see *Not exported* below.",
        "",
        "Columns: *groups* are AWQ scale groups by producer kind (norm / linear / fallback); "
        "*folded* groups had their scales folded into a producer; *mult* counts explicit "
        "per-channel input multiplies left where no fold is legal; *experts* counts 3-D expert "
        "weights left in full precision (experts following transformers' experts protocol are "
        "quantized to INT4; see [MoE experts](moe.md#moe-experts)); "
        "*fold err* is the fold-only check (float64 unless the model only runs in float32; "
        "a wrong fold gives errors of order 0.1-1 since the random scales lie in [0.25, 4], "
        f"float rounding far less; pass threshold {FOLD_TOL:.0e}; largest here: {max_fold:.1e}); "
        "*mode*: *layers* where the default `sequential=\"auto\"` quantized block by block, "
        "*whole* where it searched the whole model at once (no single block stack holds every linear); "
        "*INT4 err* is the INT4 model's max error relative to the "
        "float output (random tiny models, for orientation only).",
        "",
        "| architecture | status | export | mode | groups | folded | mult | experts | fold err | INT4 eager (err) | compile | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status in ("skipped", "untestable"):
            continue
        fold = f"{r.fold_err:.1e} ({r.fold_dtype[-2:]})" if r.fold_err is not None else "-"
        eager = "-" if r.eager_ok is None else (f"{_yn(r.eager_ok)} ({r.eager_rel_err:.2f})" if r.eager_rel_err is not None else _yn(r.eager_ok))
        status = r.status if r.status == "ok" else f"**{r.status}** ({r.stage})"
        if r.status == "ok" and not coverage(r)[0]:
            status = f"partial ({r.quantized}/{r.quantized + (len(r.kept) if r.kept is not None else r.linears - r.quantized - 1)})"
        lines.append(
            f"| {r.name} | {status} | {'no (hook-only)' if r.exported is False else _yn(r.exported)} | "
            f"{'-' if r.layer_by_layer is None else ('layers' if r.layer_by_layer else 'whole')} | "
            f"{_fmt_groups(r.groups)} | {r.folded} | "
            f"{r.fallback_multiplies} | {r.expert_params_unquantized or '-'} | {fold} | {eager} | "
            f"{_yn(r.compile_ok)} | {r.seconds:.1f} |"
        )
    partial = [r for r in results if r.status == "ok" and not coverage(r)[0]]
    lines += ["", f"## Partial: layers kept in full precision beyond the head ({len(partial)})", ""]
    lines += ["These run and are counted as successes above, but do not quantize every layer: "
              "*partial (q/n)* in the table means q of n quantizable linears (the output head not "
              "counted) hold INT4 weights.", ""]
    for r in partial:
        reasons = list(dict.fromkeys(r.kept_reasons))
        if r.expert_params_unquantized and not r.kept:
            reasons.append("awq_ao quantizes 3-D expert weights only in modules that follow transformers' experts protocol")
        why = "; ".join(reasons) if reasons else (
            "why was not recorded by this run" + ("; groups that fell back to an explicit multiply: " + "; ".join(
                f"{v} x {k}" for k, v in sorted(r.fallback_reasons.items())) if r.fallback_reasons else ""))
        names = f" ({', '.join(r.kept[:3])}{' ...' if len(r.kept) > 3 else ''})" if r.kept else ""
        lines.append(f"- **{r.name}**: {coverage(r)[1]}{names}. {why}")
    if not partial:
        lines.append("None.")
    fails = [r for r in results if r.status in ("fail", "timeout")]
    lines += ["", f"## Failures ({len(fails)})", ""]
    if not fails:
        lines.append("None.")
    for r in fails:
        lines.append(f"- **{r.name}** ({r.status}, at {r.stage}): {r.reason}")
    reasons: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    for r in results:
        for k, v in r.fallback_reasons.items():
            reasons[k] += v
            where.setdefault(k, []).append(r.name.removesuffix("ForCausalLM"))
    lines += ["", "## Why groups fall back (explicit multiply), over all architectures", ""]
    for k, v in reasons.most_common(30):
        names = where[k]
        more = f", ... ({len(names)} architectures)" if len(names) > 4 else ""
        lines.append(f"- {v} x {k} ({', '.join(names[:4])}{more})")
    if not reasons:
        lines.append("None.")
    not_exported = [r for r in results if r.exported is False]
    lines += ["", f"## Not exported by torch.export ({len(not_exported)})", ""]
    lines += [f"- **{r.name}** ({r.status}): {r.export_error}" for r in not_exported] or ["None."]
    lines += ["", f"## Untestable: the default config does not build a model ({len(untestable)})", ""]
    lines += [f"- **{r.name}**: {r.reason}" for r in untestable] or ["None."]
    lines += ["", f"## Skipped: not decoder-only or needing extra inputs ({len(skipped)})", ""]
    by_reason: dict[str, list[str]] = {}
    for r in skipped:
        by_reason.setdefault(r.reason, []).append(r.name)
    for reason, names in sorted(by_reason.items()):
        lines.append(f"- {reason}: {', '.join(names)}")
    return "\n".join(lines) + "\n"


def _meta(command: str) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import torchao

        ao = torchao.__version__
    except Exception:  # noqa: BLE001
        ao = "?"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchao": ao,
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {gpu}",
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="class names to run (default: all)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="markdown table to write")
    ap.add_argument("--json", default=DEFAULT_JSON, help="JSON results to write")
    ap.add_argument("--compile", action="store_true", help="torch.compile every architecture")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per architecture")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    ap.add_argument("--no-isolate", action="store_true", help="run in this process (no timeouts)")
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from the --json results of an earlier run (no sweep)")
    args = ap.parse_args(argv)
    if args.render_only:
        data = json.loads(Path(args.json).read_text())
        fields = set(ArchResult.__dataclass_fields__)
        results = [ArchResult(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]]
        meta = dict(data["meta"])
        meta["rendered"] = "python -m devtools.arch_sweep --render-only"
        Path(args.out).write_text(render_markdown(results, meta))
        full, n_partial = coverage_counts(results)
        print(f"{args.out}: {full} fully quantized, {n_partial} partial")
        return 0
    command = "python -m devtools.arch_sweep" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    results = sweep(
        args.only, None if args.compile else COMPILE_DEFAULT, not args.no_isolate, args.timeout, args.threads, sys.stdout,
    )
    ok, n = summary_counts(results)
    meta = _meta(command)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["success"] = ok
    meta["decoder_only"] = n
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(render_markdown(results, meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    print(f"{ok} of {n} decoder-only architectures succeed with zero per-model code ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
