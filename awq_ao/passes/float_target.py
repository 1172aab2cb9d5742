"""Rounding toward the float model's output (``gptq_float_target``, layer-by-layer mode).

In layer-by-layer mode each block is calibrated on the outputs of the blocks already
quantized (``X~``, the inputs the quantized model will really see), and error-feedback
rounding lowers ``|X~ (Q - W)^T|^2``: the block's own rounding error on those inputs. The
error the earlier blocks left in ``X~`` stays. With the float model's inputs ``X`` of the same
tokens (the float blocks run on their own float stream), the rounding can aim at the float
model's output instead, ``|X~ Q^T - X W^T|^2``. Writing ``X = X~ + dX``, its minimiser over
unconstrained ``Q`` is ``W' = W + W C H^-1`` with ``C = dX^T X~ / T`` and ``H = X~^T X~ / T``,
and ``|X~ Q^T - X W^T|^2 = |X~ (Q - W')^T|^2 + const``: so rounding ``W'`` with the usual
error feedback on ``H`` lowers the float-target error (the idea of GPTAQ, Li et al. 2025,
"asymmetric calibration"; written here from the formula). ``H`` is damped as the rounding
damps it.

:func:`cross_grams` runs one block's float forward on both streams, chunk by chunk, and
returns each linear's ``C`` and the float stream's next input; :func:`shifted_target`
applies the shift to a (scaled) weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from awq_ao.observers.activation import first_tensor
from awq_ao.passes.sample_chunks import row_chunks, rows_of, splits_rows

__all__ = ["cross_grams", "shifted_target"]


def cross_grams(
    block: nn.Module,
    float_call: tuple[tuple[Any, ...], dict[str, Any]],
    quant_call: tuple[tuple[Any, ...], dict[str, Any]],
    names: list[str],
    rows: int,
    chunk: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``({linear: C [K, K]}, the block's float output)`` of the float ``block``.

    ``float_call`` / ``quant_call``: the block's ``(args, kwargs)`` on the float model's
    inputs and on the quantized model's inputs (same tokens, ``rows`` batch rows). Both run
    through the (still float) block ``chunk`` rows at a time; a pre-hook on each linear of
    ``names`` takes its first call's input. ``C = (x_float - x_quant)^T x_quant / T`` (float32,
    token mean over every row); linears reading one input (q/k/v) share one ``C`` object.
    The block is not modified.
    """
    modules = {n: block.get_submodule(n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    shared: dict[str, str] = {}  # linear -> the linear whose C it shares (same input tensor)
    floats: dict[str, torch.Tensor] = {}
    phase = {"float": True}
    by_input: dict[int, tuple[str, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, a: tuple[Any, ...]) -> None:
            if not a or not isinstance(a[0], torch.Tensor):
                return
            x, key = a[0].detach(), id(a[0])
            if phase["float"]:
                floats.setdefault(name, x)
                return
            if name in seen:
                return
            seen.add(name)
            owner = by_input.setdefault(key, (name, a[0]))[0]  # the tensor kept: its id stays unique
            if owner != name:
                shared[name] = owner
                return
            xq = x.reshape(-1, x.shape[-1]).float()
            xf = floats[name].reshape(-1, x.shape[-1]).float()
            if xf.shape != xq.shape:
                raise RuntimeError(f"gptq_float_target: {name} saw inputs of shapes {tuple(xf.shape)} and "
                                   f"{tuple(xq.shape)} on the float and quantized streams")
            c = (xf - xq).t() @ xq
            sums[name] = c if name not in sums else sums[name] + c
            tokens[name] = tokens.get(name, 0) + xq.shape[0]

        return hook

    seen: set[str] = set()
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    outs: list[torch.Tensor] = []
    fa, fkw = float_call
    qa, qkw = quant_call
    if not splits_rows(fa, fkw, rows):
        chunk = rows
    try:
        with torch.no_grad():
            for start, stop in row_chunks(rows, chunk):
                floats.clear()
                seen.clear()
                by_input.clear()
                phase["float"] = True
                ca, ckw = rows_of(fa, fkw, rows, start, stop)
                out = first_tensor(block(*ca, **ckw))
                outs.append(out.detach() if out is not None else None)
                phase["float"] = False
                ca, ckw = rows_of(qa, qkw, rows, start, stop)
                block(*ca, **ckw)
                del ca, ckw
    finally:
        for h in handles:
            h.remove()
    result = {n: sums[n] / max(tokens[n], 1) for n in sums}
    for name, owner in shared.items():
        if owner in result:
            result[name] = result[owner]
    nxt = None if any(o is None for o in outs) else (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0))
    return result, nxt


def shifted_target(w: torch.Tensor, cross: torch.Tensor, full: torch.Tensor, damp: float) -> torch.Tensor:
    """``W + W C (H + damp * mean(diag H) * I)^-1`` for ``w [N, K]``, ``cross`` ``C [K, K]`` and the
    Gram ``full`` ``H [K, K]`` (all of the same, possibly scaled, inputs). Computed in float64;
    returned in ``w``'s dtype."""
    h = full.to(w.device, torch.float64).clone()
    mean_diag = float(torch.diagonal(h).mean())
    torch.diagonal(h).add_(damp * mean_diag if mean_diag > 0 else 1.0)  # all inputs zero: no shift
    w64 = w.to(torch.float64)
    rhs = cross.to(w.device, torch.float64).t() @ w64.t()  # C^T W^T
    delta = torch.linalg.solve(h, rhs).t()  # (H^-1 C^T W^T)^T = W C H^-1 (H symmetric)
    return (w64 + delta).to(w.dtype)
