"""The kept calibration sample in chunks: the search chunk, and Grams over every kept row.

The calibration sample that convert replays (``max_gram_samples`` rows, see
:class:`awq_ao.options.SearchOptions`) has two uses of different cost:

* the scale search scores every candidate scale on a module forward, so it runs on the first
  ``max_search_samples`` rows only (the *search chunk*);
* the input Grams of clipping and error-feedback rounding cost one Gram update per linear, so
  they are accumulated over every kept row, one chunk of ``max_search_samples`` rows at a time
  (peak memory stays that of one chunk's forward).

Grams are token means (``X^T X / T``), so chunks combine as a token-weighted mean. Linears
that shared one Gram object after the search chunk (q/k/v, gate/up: one input) share the
combined one, which error-feedback rounding relies on to round them in one call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from awq_ao.observers.activation import first_tensor
from awq_ao.passes.clipping import group_gram
from awq_ao.passes.replay import snapshot_call
from awq_ao.passes.rounding import full_gram

__all__ = ["splits_rows", "row_chunks", "rows_of", "gram_tokens", "accumulate_grams"]


def rows_of(args: tuple[Any, ...], kwargs: dict[str, Any], total: int, start: int, stop: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rows ``start:stop`` of every tensor whose leading dim is the batch (``total`` rows).

    Tensors without that leading dim (rotary tables shared by the batch, scalars) and
    non-tensors pass through; cache objects are copied so a chunk never mutates the original.
    """
    if start == 0 and stop >= total:
        return args, kwargs

    def f(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total:
            return t[start:stop]
        return t

    a, kw = snapshot_call(tuple(args), dict(kwargs))
    return tuple(tree_map(f, a)), tree_map(f, kw)


def splits_rows(args: tuple[Any, ...], kwargs: dict[str, Any], total: int) -> bool:
    """Whether the call's first tensor carries the ``total`` batch rows in its leading dim,
    so that :func:`rows_of` can cut it (else the sample is used whole)."""
    t = first_tensor((args, kwargs))
    return t is not None and t.dim() > 1 and t.shape[0] == total


def row_chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` chunks of ``size`` rows covering ``total`` rows (the last may be short)."""
    size = max(1, size)
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def gram_tokens(x: torch.Tensor, max_tokens: int | None) -> int:
    """Tokens a Gram of ``x [..., K]`` averages over (after subsampling to ``max_tokens``)."""
    t = x.numel() // max(x.shape[-1], 1)
    return min(t, max_tokens) if max_tokens is not None else t


def accumulate_grams(
    root: nn.Module,
    grams: dict[str, torch.Tensor],
    tokens: dict[str, int],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    total: int,
    first: int,
    config: Any,
    experts: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Add rows ``first:total`` of the sample to the Grams of the search chunk (rows ``:first``).

    ``grams``: linear name -> its Gram from the search chunk (full ``[K, K]`` or per group
    ``[G, g, g]``; objects shared by several linears stay shared), averaged over
    ``tokens[name]`` tokens. The extra rows are replayed through ``root`` in chunks of
    ``first`` rows with a pre-hook on each of those linears; the model is not modified.
    ``config.clip_tokens`` caps the tokens of each chunk, as it does the search chunk's.
    ``experts`` (experts module -> ``ExpertsInfo``): their experts' Grams (keys
    ``module.attr[e]``) get the tokens routed to each expert in the extra rows too; a Gram of
    an expert that had none in the search chunk (``tokens`` 0: the whole block's stand-in) is
    replaced by its routed tokens' where the extra rows have some. Returns the combined Grams.
    """
    if total <= first or not grams:
        return grams
    modules = dict(root.named_modules())
    cap = config.clip_tokens
    owners = {name: id(g) for name, g in grams.items()}
    # per distinct Gram object: [the search chunk's Gram, its tokens, extra token-weighted sum, extra tokens]
    acc: dict[int, list[Any]] = {}
    for name, g in grams.items():
        acc.setdefault(id(g), [g, tokens.get(name, 0), None, 0])
    seen: set[tuple[int, int]] = set()
    called: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, a: tuple[Any, ...]) -> None:
            if not a or not isinstance(a[0], torch.Tensor):
                return
            x = a[0]
            key = owners[name]
            if name in called:  # a linear called twice: its first call counts, as in the search
                return
            called.add(name)
            if (key, id(x)) in seen:  # q/k/v: one input, one shared Gram, added once
                return
            seen.add((key, id(x)))
            add(key, x)

        return hook

    def add(key: int, x: torch.Tensor) -> None:
        entry = acc[key]
        orig = entry[0]
        g = full_gram(x, cap) if orig.dim() == 2 else group_gram(x, config.group_size, cap)
        t = gram_tokens(x, cap)
        entry[2] = g.to(orig.device, orig.dtype) * t if entry[2] is None else entry[2] + g.to(orig.device, orig.dtype) * t
        entry[3] += t

    def experts_hook(name: str):
        from awq_ao.passes.experts_search import expert_inputs, experts_call

        info = experts[name]

        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            call = experts_call(a, kw)
            if call is None or name in called:
                return
            called.add(name)
            for e in range(info.num_experts):
                xe, h, n = expert_inputs(module, info, *call, e, stand_in=False)
                if n == 0:  # no routed token in these rows: nothing to add
                    continue
                for attr, x in ((info.up_attr, xe), ("down_proj", h)):
                    key = f"{name}.{attr}[{e}]"
                    if key in owners:
                        add(owners[key], x)

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in grams if name in modules]
    for name in experts or {}:
        if any(k.startswith(f"{name}.") and k not in modules for k in grams):
            handles.append(modules[name].register_forward_pre_hook(experts_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            for start, stop in row_chunks(total - first, first):
                seen.clear()
                called.clear()
                a, kw = rows_of(args, kwargs, total, start + first, stop + first)
                root(*a, **kw)
                del a, kw
    finally:
        for h in handles:
            h.remove()
    combined: dict[int, torch.Tensor] = {}
    for key, (orig, t0, extra, t1) in acc.items():
        combined[key] = orig if extra is None else (orig * t0 + extra) / (t0 + t1)
    return {name: combined[owners[name]] for name in grams}
