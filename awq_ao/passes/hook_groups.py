"""Scale groups without a graph, for models torch.export cannot capture.

One forward of a small sample with hooks tells which target linears read the same tensor
(one group) and which module produced it. Only norm-like producers (a module whose only
parameters are a per-channel ``weight`` and optional ``bias``) are folded, and only after a
numerical check: the fold is tried with random scales and must leave the *whole model's*
output unchanged; otherwise the group uses the explicit-multiply fallback. Linear-to-linear
folds need the graph and are never attempted here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from awq_ao.observers.activation import first_tensor
from awq_ao.observers.attach import conv1d_class
from awq_ao.passes.fold import Transaction, fold_group
from awq_ao.passes.groups import GraphAnalysis, ParamFold, Producer, ScaleGroup, enclosing_module


def _norm_like(mod: nn.Module, channels: int) -> list[str] | None:
    names = [n for n, _ in mod.named_parameters(recurse=False)]
    if any(True for _ in mod.children()) or "weight" not in names or not set(names) <= {"weight", "bias"}:
        return None
    if any(p.dim() != 1 or p.shape[0] != channels for p in mod.parameters(recurse=False)):
        return None
    return names


def hook_groups(
    model: nn.Module, targets: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> GraphAnalysis:
    """Groups from one hooked forward of ``(args, kwargs)``; folds verified numerically."""
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    consumed: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # keep tensors alive so ids stay unique
    handles = []

    def post(name: str):
        def hook(m: nn.Module, a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced.setdefault(id(out), name)
                keep.append(out)

        return hook

    def pre(name: str):
        def hook(m: nn.Module, a: tuple[Any, ...]) -> None:
            if a and isinstance(a[0], torch.Tensor):
                consumed.setdefault(id(a[0]), [])
                if name not in consumed[id(a[0])]:
                    consumed[id(a[0])].append(name)
                keep.append(a[0])

        return hook

    try:
        for name, mod in modules.items():
            if name:
                handles.append(mod.register_forward_hook(post(name)))
        for t in targets:
            handles.append(modules[t].register_forward_pre_hook(pre(t)))
        with torch.no_grad():
            ref = first_tensor(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    c1d = conv1d_class()
    groups: list[ScaleGroup] = []
    seen: set[str] = set()
    for key, cons in consumed.items():
        cons = [c for c in cons if c not in seen]
        if not cons:
            continue
        seen.update(cons)
        w0 = modules[cons[0]].weight
        in_f = int(w0.shape[0] if c1d is not None and isinstance(modules[cons[0]], c1d) else w0.shape[1])
        g = ScaleGroup(x_node=f"hook:{cons[0]}", in_features=in_f, consumers=cons)
        g.consumer_is_conv1d = {c: c1d is not None and isinstance(modules[c], c1d) for c in cons}
        g.inspect = enclosing_module(modules, cons)
        pname = produced.get(key)
        pnames = _norm_like(modules[pname], in_f) if pname else None
        if pname is None or pnames is None:
            g.reason = "no graph: producer unknown or not a per-channel norm (hook-only mode)"
        else:
            params = [ParamFold(f"{pname}.{n}") for n in pnames]
            g.producer = Producer("norm", pname, params, in_f)
            g.channel_map = torch.arange(in_f)
            g.foldable = True
        groups.append(g)
    keep.clear()
    for g in groups:
        if g.foldable and not _fold_is_exact(model, g, args, kwargs, ref):
            g.foldable = False
            g.producer = Producer("none")
            g.reason = "hook-only: folding into the producer changed the model output"
    unseen = [t for t in targets if t not in seen]
    return GraphAnalysis(groups, unseen, set(), [])


def _fold_is_exact(
    model: nn.Module, g: ScaleGroup, args: tuple[Any, ...], kwargs: dict[str, Any], ref: torch.Tensor | None
) -> bool:
    if ref is None:
        return False
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(g.in_features, generator=gen, dtype=torch.float64) + 0.5
    txn = Transaction()
    try:
        fold_group(model, g, s, txn)
        with torch.no_grad():
            out = first_tensor(model(*args, **kwargs))
    finally:
        txn.rollback()
    if out is None:
        return False
    err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12))
    tol = 1e-9 if ref.dtype == torch.float64 else (1e-4 if ref.dtype == torch.float32 else 2e-2)
    return err < tol
