"""Apply AWQ scales: fold 1/s into producers, s into consumers, or insert an explicit multiply.

All edits go through a :class:`Transaction` that assigns new tensors/modules instead of
writing in place, so a failure anywhere in convert restores the user's model exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_ao.passes.groups import ParamFold, ScaleGroup


@dataclass
class _Spilled:
    """Where a rollback original written to disk by :meth:`Transaction.spill` lives."""

    path: Path
    key: str
    is_param: bool
    requires_grad: bool

    def load(self, cache: dict[Path, dict[str, torch.Tensor]]) -> torch.Tensor:
        if self.path not in cache:
            cache.clear()  # one file at a time: rollback walks the log newest first
            cache[self.path] = torch.load(self.path, weights_only=True)
        t = cache[self.path][self.key]
        return nn.Parameter(t, requires_grad=self.requires_grad) if self.is_param else t


class Transaction:
    """Records attribute and module replacements so they can be undone.

    ``spill_dir``: a folder where :meth:`spill` may write the recorded full-precision
    originals (a private temporary folder is made inside it and removed by :meth:`close`).
    """

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self._log: list[tuple[Any, str, Any]] = []
        self._seen: set[tuple[int, str]] = set()
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill_dir: Path | None = None
        self._spills = 0
        self.spilled_bytes = 0

    def spill(self, min_bytes: int = 4096) -> int:
        """Write the recorded originals of at least ``min_bytes`` to disk and drop them.

        Sequential convert calls this after each block: the originals are kept only so a
        failure can restore the model, and holding them would keep the whole full-precision
        model in memory next to its INT4 copy. Parameters of modules that left the model
        (e.g. a replaced ``Conv1D``) are spilled too. Returns the bytes written. Raises
        ``OSError`` naming the folder if the write fails (e.g. the disk is full); nothing
        is dropped then, so rollback still works.
        """
        if self._spill_root is None:
            raise ValueError("this Transaction has no spill_dir")
        slots: list[tuple[Any, str, torch.Tensor]] = []  # (log index or module, attr, tensor)
        for i, (_obj, attr, old) in enumerate(self._log):
            if isinstance(old, torch.Tensor) and old.device.type != "meta" and old.nbytes >= min_bytes:
                slots.append((i, attr, old))
            elif isinstance(old, nn.Module):
                for m in old.modules():
                    for name, p in m._parameters.items():
                        if p is not None and p.device.type != "meta" and p.nbytes >= min_bytes:
                            slots.append((m, name, p))
        if not slots:
            return 0
        if self._spill_dir is None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="awq_ao_rollback_", dir=self._spill_root))
        path = self._spill_dir / f"originals_{self._spills:05d}.pt"
        data: dict[str, torch.Tensor] = {}
        for k, (_, _, t) in enumerate(slots):
            v = t.detach()
            # a view would save its whole storage: save a compact copy instead
            if v.untyped_storage().nbytes() != v.nbytes or not v.is_contiguous():
                v = v.contiguous().clone()
            data[str(k)] = v
        nbytes = sum(v.nbytes for v in data.values())
        try:
            torch.save(data, path)
        except (OSError, RuntimeError) as e:
            path.unlink(missing_ok=True)
            raise OSError(
                f"could not write {nbytes / 2**20:.0f} MiB of rollback originals to {self._spill_dir}: {e}. "
                "Free disk space there, pass another spill_dir, or spill_dir=None to keep them in memory."
            ) from e
        del data
        self._spills += 1
        for k, (slot, attr, t) in enumerate(slots):
            rec = _Spilled(path, str(k), isinstance(t, nn.Parameter), bool(t.requires_grad))
            if isinstance(slot, int):
                obj, _, _ = self._log[slot]
                self._log[slot] = (obj, attr, rec)
            else:
                slot._parameters[attr] = torch.empty(t.shape, dtype=t.dtype, device="meta")
                self._log.append((slot, attr, rec))
        self.spilled_bytes += nbytes
        return nbytes

    def move_saved(self, device: torch.device | str) -> None:
        """Move the recorded originals to ``device``.

        ``module.to()`` moves a module's parameters in place, so in sequential mode with a
        compute device the originals recorded while a block was there are device tensors;
        the block goes back home afterwards and its originals must follow (else they pile
        up in device memory, and a rollback would restore device tensors).
        """
        dev = torch.device(device)
        for i, (obj, attr, old) in enumerate(self._log):
            if isinstance(old, torch.Tensor) and old.device.type not in ("meta", dev.type):
                moved = old.detach().to(dev)
                if isinstance(old, nn.Parameter):
                    moved = nn.Parameter(moved, requires_grad=old.requires_grad)
                self._log[i] = (obj, attr, moved)

    def close(self) -> None:
        """Delete the spilled files (after commit or rollback)."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def record(self, obj: Any, attr: str) -> None:
        """Remember ``obj.<attr>`` as it is now (once per attribute) so that :meth:`rollback`
        restores it; call before changing the attribute in place or by assignment."""
        key = (id(obj), attr)
        if key not in self._seen:
            self._seen.add(key)
            self._log.append((obj, attr, obj._parameters.get(attr) if attr in getattr(obj, "_parameters", {}) else getattr(obj, attr)))

    def set_param(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        """Replace ``module.<attr>`` by a new parameter holding ``value``."""
        self.record(module, attr)
        old = getattr(module, attr)
        req = bool(getattr(old, "requires_grad", False))
        setattr(module, attr, nn.Parameter(value, requires_grad=req))

    def set_module(self, root: nn.Module, name: str, new: nn.Module) -> None:
        """Replace the submodule ``name`` of ``root`` by ``new``."""
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        self.record(parent, child)
        setattr(parent, child, new)
        if isinstance(old, nn.Module) and not any(m is old for m in new.modules()):
            self._release(old)

    def _release(self, module: nn.Module) -> None:
        """Give a module that left the model its original parameters back now.

        Its folded/clipped copies were only needed to build the replacement (e.g. the
        ``nn.Linear`` that replaces a GPT-2 ``Conv1D``); keeping them until commit would hold a
        full-precision copy of every replaced weight. Rollback restores the same originals.
        """
        for obj, attr, old in self._log:
            if obj is module and attr in module._parameters and not isinstance(old, _Spilled):
                module._parameters[attr] = old

    def rollback(self) -> None:
        """Undo every recorded change, newest first (reading spilled originals back)."""
        cache: dict[Path, dict[str, torch.Tensor]] = {}
        for obj, attr, old in reversed(self._log):
            if isinstance(old, _Spilled):
                old = old.load(cache)
            if isinstance(obj, nn.Module) and isinstance(old, nn.Module):
                setattr(obj, attr, old)
            elif isinstance(obj, nn.Module) and attr in obj._parameters:
                obj._parameters[attr] = old
            else:
                setattr(obj, attr, old)
        self._log.clear()
        self._seen.clear()


def _apply_affine(v: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
    for op, c in ops:
        if op == "mul":
            v = v * c
        elif op == "add":
            v = v + c
        elif op == "rsub":
            v = c - v
    return v


def _invert_affine(v: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
    for op, c in reversed(ops):
        if op == "mul":
            v = v / c
        elif op == "add":
            v = v - c
        elif op == "rsub":
            v = c - v
    return v


def _scale_along(p: torch.Tensor, s: torch.Tensor, dim: int, divide: bool) -> torch.Tensor:
    shape = [1] * p.dim()
    shape[dim] = -1
    sv = s.to(p.device, torch.float64).view(shape)
    src = p.detach()
    if src.dim() == 0:
        return (src.double() / sv if divide else src.double() * sv).to(p.dtype)
    out = torch.empty_like(src)
    # float64 one row chunk at a time: a whole 8192 x 2048 weight would be 128 MiB per temporary
    for r0 in range(0, src.shape[0], 1024):
        v = src[r0 : r0 + 1024].double()
        svc = sv[r0 : r0 + 1024] if dim == 0 else sv
        out[r0 : r0 + 1024] = v / svc if divide else v * svc
    return out


def fold_producer(model: nn.Module, pf: ParamFold, s_prod: torch.Tensor, txn: Transaction) -> None:
    """Divide the producer's output channels by ``s_prod`` through parameter ``pf``."""
    mod_name, _, attr = pf.name.rpartition(".")
    mod = model.get_submodule(mod_name)
    p = getattr(mod, attr)
    if pf.affine:
        v = _apply_affine(p.detach().double(), pf.affine) / s_prod.to(p.device, torch.float64)
        new = _invert_affine(v, pf.affine).to(p.dtype)
    else:
        new = _scale_along(p, s_prod, pf.dim, divide=True)
    txn.set_param(mod, attr, new)


def scale_consumer(module: nn.Module, is_conv1d: bool, s: torch.Tensor, txn: Transaction) -> None:
    """Multiply a consumer's input channels by ``s`` (Linear: columns; Conv1D: rows)."""
    txn.set_param(module, "weight", _scale_along(module.weight, s, 0 if is_conv1d else 1, divide=False))


def producer_scales(group: ScaleGroup, s_x: torch.Tensor) -> torch.Tensor:
    """Per producer channel scale (1 for channels that do not reach X)."""
    assert group.channel_map is not None
    s = torch.ones(group.producer.out_channels, dtype=torch.float64)
    s[group.channel_map] = s_x.detach().double().cpu()
    return s


def fold_group(model: nn.Module, group: ScaleGroup, s_x: torch.Tensor, txn: Transaction) -> None:
    """Fold the scales of a foldable group into its producer and all readers of X."""
    if not group.foldable:
        raise ValueError("fold_group needs a foldable group")
    s_prod = producer_scales(group, s_x)
    for pf in group.producer.params:
        fold_producer(model, pf, s_prod, txn)
    for name in group.consumers + group.rescaled:
        scale_consumer(model.get_submodule(name), group.consumer_is_conv1d.get(name, False), s_x, txn)
    for pname, dim in group.rescaled_params:  # e.g. MoE routers, kept in full precision
        owner, _, attr = pname.rpartition(".")
        mod = model.get_submodule(owner)
        txn.set_param(mod, attr, _scale_along(getattr(mod, attr), s_x, dim, divide=False))
