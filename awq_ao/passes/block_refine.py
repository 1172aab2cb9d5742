"""Block-output refinement of a quantized block's codes and scales (``refine_steps``).

After awq_ao has scaled, clipped, rounded and packed a decoder block's linears (each on its
own output error), this pass tunes them *jointly* on the block's output: every weight gets
an offset ``v`` on top of its code (the code used is ``round(code + v)``, gradient passed
straight through the rounding, ``|v| <= vmax``), every group a multiplier ``m`` on its scale
(``1 - m_range <= m <= 1 + m_range``; the zero points stay). Both take signed gradient steps
(the step size decays linearly from ``lr`` to 0) on the mean squared error between the
block's output and a target, a few calibration rows per step. In layer-by-layer mode the
target is the float block's output on the float model's own stream, so the refinement also
compensates the error the earlier quantized blocks left (AutoRound's objective, started from
awq_ao's solution instead of round-to-nearest). The result is kept only if it lowers the
error on all the calibration rows; otherwise the block is left exactly as it was.

Only 2-D INT weights (:class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`) are tuned; MoE
expert weights are left as they are. Storage, kernels and formats do not change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.quant_math import group_geometry
from awq_ao.observers.activation import first_tensor
from awq_ao.passes.sample_chunks import row_chunks, rows_of, splits_rows

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class RefineResult:
    """What :func:`refine_block` did to one block."""

    loss_before: float  # mean squared output error on all calibration rows, before
    loss_after: float  # the same with the refined codes and scales (kept only if lower)
    kept: bool
    changed_codes: int  # codes that differ from the ones before (0 if not kept)
    codes: int  # codes in the block's tuned linears
    seconds: float


class _OpenLinear:
    """One INT linear opened for tuning: its codes and grid, ``v`` and ``m``; while open, the
    module's ``weight`` is a plain tensor computed from them."""

    def __init__(self, mod: nn.Linear) -> None:
        w = mod.weight
        assert isinstance(w, Int4WeightTensor)
        self.mod, self.param = mod, mod._parameters["weight"]
        self.bits, self.group_size, self.dtype = w.bits, w.group_size, w.dtype
        self.scale_dtype = w.scale.dtype
        k = w.shape[1]
        dev = w.device
        self.col = torch.arange(k, device=dev) // group_geometry(k, w.group_size).size
        self.q0 = w.codes().to(dev, torch.float32)
        self.s = w.scale.to(dev, torch.float32)
        self.z = w.zero.to(dev, torch.float32)
        self.v = torch.zeros_like(self.q0, requires_grad=True)
        self.m = torch.ones_like(self.s, requires_grad=True)
        del mod._parameters["weight"]

    def set_weight(self) -> None:
        c = self.q0 + self.v
        c = (c + (torch.round(c) - c).detach()).clamp(0, 2**self.bits - 1)
        w = (c - self.z[:, self.col]) * (self.s * self.m)[:, self.col]
        self.mod.weight = w.to(self.dtype)  # a plain attribute while open

    def step(self, lr: float, vmax: float, m_range: float) -> None:
        with torch.no_grad():
            if self.v.grad is not None:
                self.v -= lr * torch.sign(self.v.grad)
                self.v.clamp_(-vmax, vmax)
            if self.m.grad is not None:
                self.m -= lr * torch.sign(self.m.grad)
                self.m.clamp_(1 - m_range, 1 + m_range)
        self.v.grad = None
        self.m.grad = None

    def pack(self) -> int:
        """Store the tuned codes and scales as a new INT weight; returns how many codes changed."""
        self.mod.__dict__.pop("weight", None)
        with torch.no_grad():
            codes = torch.round(self.q0 + self.v).clamp_(0, 2**self.bits - 1)
            scale = (self.s * self.m).to(self.scale_dtype)
        q = Int4WeightTensor.from_codes(codes.to(torch.uint8), scale, self.z.to(torch.uint8), self.bits,
                                        self.group_size, dtype=self.dtype)
        self.mod.weight = nn.Parameter(q, requires_grad=False)
        return int((codes != self.q0).sum())

    def restore(self) -> None:
        """Put back the original weight Parameter (the very object)."""
        self.mod.__dict__.pop("weight", None)
        self.mod._parameters.pop("weight", None)
        self.mod.weight = self.param


def _rows(call: Call, total: int, idx: torch.Tensor) -> Call:
    """Rows ``idx`` (any order) of every tensor of the call whose leading dim is the batch;
    :func:`~awq_ao.passes.sample_chunks.rows_of` cuts contiguous ranges only."""
    def pick(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total:
            return t[idx.to(t.device)]
        return t

    return tree_map(pick, call)


def _output(block: nn.Module, call: Call) -> torch.Tensor:
    out = first_tensor(block(*call[0], **call[1]))
    if out is None:
        raise RuntimeError("refine_steps: the block returned no tensor output")
    return out


def refine_block(block: nn.Module, call: Call, rows: int, target: torch.Tensor, steps: int, lr: float,
                 batch: int, seed: int = 0, vmax: float = 1.0, m_range: float = 0.2,
                 chunk: int = 8) -> RefineResult | None:
    """Tune the codes and scales of ``block``'s INT linears on its output (module docstring).

    ``call``: the block's ``(args, kwargs)`` for all ``rows`` calibration rows (its hidden
    input the quantized model's); ``target``: the output to approach, ``[rows, ...]`` like the
    block's. ``batch`` rows per step, drawn with a generator seeded by ``seed``; the full-sample
    errors before and after (with the packed weights, so they are exactly what is stored)
    are computed ``chunk`` rows at a time. Returns None when the block
    holds no 2-D INT linear.
    """
    mods = [m for m in block.modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, Int4WeightTensor) and m.weight.dim() == 2]
    if not mods:
        return None
    t0 = time.perf_counter()
    if not splits_rows(*call, rows):
        batch = chunk = rows
    gen = torch.Generator().manual_seed(seed)

    def full_loss() -> float:  # with the block's weights as they are (packed)
        with torch.no_grad():
            total = 0.0
            for start, stop in row_chunks(rows, chunk):
                out = _output(block, rows_of(*call, rows, start, stop))
                total += float(((out.float() - target[start:stop].float()) ** 2).sum())
            return total / target.numel()

    before = full_loss()
    frozen = [p for p in block.parameters() if p.requires_grad]
    opened: list[_OpenLinear] = []
    kept = False
    changed = 0
    try:
        for p in frozen:
            p.requires_grad_(False)
        # the steps need autograd also where the caller turned it off (the CLI converts under
        # no_grad; convert refuses torch.inference_mode, whose tensors autograd cannot save)
        with torch.enable_grad():
            for m in mods:  # one at a time: a failure restores those already opened
                opened.append(_OpenLinear(m))
            for i in range(steps):
                idx = torch.randperm(rows, generator=gen)[:batch]
                for o in opened:
                    o.set_weight()
                out = _output(block, _rows(call, rows, idx))
                loss = ((out.float() - target[idx.to(target.device)].float()) ** 2).mean()
                loss.backward()
                for o in opened:
                    o.step(lr * (1 - i / steps), vmax, m_range)
        changed = sum(o.pack() for o in opened)
        after = full_loss()
        kept = after < before
    finally:
        if not kept:
            for o in opened:
                o.restore()
            changed = 0
        for p in frozen:
            p.requires_grad_(True)
    return RefineResult(before, after, kept, changed, sum(o.q0.numel() for o in opened), time.perf_counter() - t0)
