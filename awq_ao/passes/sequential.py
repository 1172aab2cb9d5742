"""Layer-by-layer convert: one decoder block at a time.

1. One cheap pass of the kept calibration sample (``max_gram_samples`` rows) records every block's call: block 0 runs
   for real, the other blocks are replaced by a pass-through for that pass, so only their
   keyword arguments (masks, rotary embeddings, which may differ per block, e.g. sliding
   window layers) are recorded; the pass stops at the last block (no output head).
2. For each block: move it to ``config.device`` (if set), run the AWQ algorithm on *the
   block* (:func:`awq_ao.passes.pipeline.awq_root`: capture, groups, search on the cached
   block inputs, fold, clip, round, pack), then run the quantized block to get the next
   block's inputs, ``max_search_samples`` rows at a time. Activations are cached on the CPU;
   peak device memory is one block plus one chunk's activations.
   With ``gptq_float_target`` or ``block_refine_steps`` the float block first runs on the
   float model's own stream (a second cached hidden state); ``block_refine_steps`` then tunes
   the packed block toward that output (:mod:`awq_ao.passes.block_refine`).

Linears outside the repeated blocks (rare: projections before/after the stack) are quantized
without scaling and listed in the report's warnings.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from awq_ao.config import AWQConfig
from awq_ao.memory import release_freed_memory
from awq_ao.observers.activation import RecordedCall, first_tensor
from awq_ao.passes.apply import add_time, apply_found
from awq_ao.passes.block_refine import refine_block
from awq_ao.passes.capture import call_kwargs
from awq_ao.passes.float_target import cross_grams
from awq_ao.passes.fold import Transaction
from awq_ao.passes.pipeline import awq_root, stack_calls
from awq_ao.passes.sample_chunks import row_chunks, rows_of, splits_rows
from awq_ao.progress import current
from awq_ao.report import ConvertReport


class _StopForward(Exception):
    """Raised to end the recording pass after the last block."""


def find_blocks(model: nn.Module, targets: list[str]) -> tuple[str, list[nn.Module]]:
    """The ModuleList of repeated blocks holding the most target linears."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1:
            continue
        prefix = f"{name}."
        count = sum(1 for t in targets if t.startswith(prefix))
        if count and (best is None or count > best[0]):
            best = (count, name, list(mod))
    if best is None:
        raise ValueError(
            "sequential mode needs a stack of repeated blocks (an nn.ModuleList of identical "
            "decoder layers holding the linears); none was found. Use sequential=False."
        )
    return best[1], best[2]


def _to(obj: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return obj
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def record_block_calls(
    model: nn.Module, blocks: list[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each block's (args, kwargs) for the sample, without running blocks 1..n-1."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(blocks)
    out0: list[Any] = []
    handles = []
    saved_forward: dict[int, Any] = {}

    def pre(i: int):
        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            calls[i] = (a, dict(kw))
            if i == len(blocks) - 1:
                raise _StopForward

        return hook

    def post0(module: nn.Module, a: Any, out: Any) -> None:
        out0.append(out)

    def passthrough(*a: Any, **kw: Any) -> Any:
        x = a[0] if a else kw.get("hidden_states")
        ref = out0[0] if out0 else None
        if isinstance(ref, tuple):
            return (x, *ref[1:])
        return x

    try:
        for i, b in enumerate(blocks):
            handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
            if i > 0:
                saved_forward[i] = b.__dict__.get("forward")
                b.forward = passthrough  # type: ignore[method-assign]
        handles.append(blocks[0].register_forward_hook(post0))
        with torch.no_grad():
            try:
                model(*args, **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        for i, f in saved_forward.items():
            if f is None:
                blocks[i].__dict__.pop("forward", None)
            else:
                blocks[i].forward = f  # type: ignore[method-assign]
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"blocks {missing[:5]} were not called by the model's forward")
    return calls  # type: ignore[return-value]


def _with_hidden(call: tuple[tuple[Any, ...], dict[str, Any]], h: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    a, kw = call
    if a:
        return (h, *a[1:]), kw
    kw = dict(kw)
    kw["hidden_states"] = h
    return a, kw


def _block_output(block: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], rows: int,
                  chunk: int) -> torch.Tensor | None:
    """The block's hidden output for all ``rows`` rows, run ``chunk`` rows at a time."""
    outs = []
    if not splits_rows(a, kw, rows):
        chunk = rows
    with torch.no_grad():
        for start, stop in row_chunks(rows, chunk):
            ca, ckw = rows_of(a, kw, rows, start, stop)
            out = first_tensor(block(*ca, **ckw))
            if out is None:
                return None
            outs.append(out.detach())
            del ca, ckw
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def convert_sequential(
    model: nn.Module,
    calls: list[RecordedCall],
    targets: list[str],
    observers: dict[str, Any],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
) -> None:
    """Run search/fold/quantize block by block (see the module docstring)."""
    release_freed_memory()  # what the user's calibration loop freed
    blocks_name, blocks = find_blocks(model, targets)
    report.mode = f"layer by layer ({len(blocks)} blocks of {blocks_name})"
    args, kwargs, rows = stack_calls(calls)
    kwargs = call_kwargs(model, kwargs)
    block_calls = record_block_calls(model, blocks, args, kwargs)
    dev = torch.device(config.device) if config.device else None
    h0 = first_tensor(block_calls[0])
    if h0 is None:
        raise RuntimeError("the first block received no tensor input")
    hidden = h0.detach().to("cpu")
    float_target = config.gptq_float_target and config.rounding == "gptq"
    refine = config.refine_steps > 0
    hidden_float = hidden if float_target or refine else None
    done: set[str] = set()
    run = current()
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}."
        local = [t[len(prefix):] for t in targets if t.startswith(prefix)]
        home = next((p.device for p in block.parameters()), None)
        if dev is not None:
            block.to(dev)
        a, kw = _with_hidden(block_calls[i], hidden)
        a, kw = _to(a, dev), _to(kw, dev)
        cross = target = None
        if hidden_float is not None:  # the float block on the float model's stream, before quantizing it
            t0 = time.perf_counter()
            fa, fkw = _to(_with_hidden(block_calls[i], hidden_float), dev)
            if float_target:
                cross, nxt_float = cross_grams(block, (fa, fkw), (a, kw), local, rows, config.max_search_samples)
            else:
                nxt_float = _block_output(block, fa, fkw, rows, config.max_search_samples)
            del fa, fkw
            if nxt_float is None:
                raise RuntimeError(f"block {blocks_name}.{i} has no tensor output (needed for the float stream)")
            target = nxt_float if refine else None
            hidden_float = nxt_float.to("cpu")
            add_time(report, "float stream", time.perf_counter() - t0)
        if local:
            obs = {n: observers[prefix + n] for n in local if prefix + n in observers}
            awq_root(block, RecordedCall(a, kw, rows), a, kw, local, obs, config, txn, report, prefix,
                     label=f" block {i + 1}/{len(blocks)}", split=config.split_blocks, float_cross=cross)
            done.update(prefix + n for n in local)
            if target is not None:
                t0 = time.perf_counter()
                if run is not None:
                    run.set_detail("refine", f"{i + 1}/{len(blocks)}")
                res = refine_block(block, (a, kw), rows, target, config.refine_steps, config.block_refine_lr,
                                   config.block_refine_batch, seed=i)
                if res is not None:
                    report.block_refine.append(res)
                if run is not None:
                    for n in local:
                        run.linear_done("refine", prefix + n)
                add_time(report, "block refine", time.perf_counter() - t0)
        t0 = time.perf_counter()
        nxt = _block_output(block, a, kw, rows, config.max_search_samples)
        add_time(report, "block outputs", time.perf_counter() - t0)
        if nxt is None or not torch.isfinite(nxt).all():
            raise FloatingPointError(
                f"the output of block {blocks_name}.{i} contains NaN/Inf after quantization "
                "(or has no tensor output); try a wider dtype or more bits."
            )
        hidden = nxt.detach().to("cpu")
        if dev is not None and home is not None:
            block.to(home)
            txn.move_saved(home)
        del nxt, a, kw, cross, target
        if config.spill_dir is not None:
            txn.spill()
        release_freed_memory()
    rest = [t for t in targets if t not in done]
    if rest:
        apply_found(model, None, {}, {}, rest, config, txn, report)
        report.warnings.append(
            f"{len(rest)} linears outside {blocks_name} were quantized without scaling: "
            + ", ".join(rest[:5])
        )
    report.spilled_bytes = txn.spilled_bytes
