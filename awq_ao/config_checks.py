"""Checks of every :class:`~awq_ao.config.AWQConfig` option, with messages that name the
option, the value given and what it accepts (the one place options are validated)."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import TYPE_CHECKING

from awq_ao.lowering.quant_math import SUPPORTED_BITS
from awq_ao.options import GROUPS

if TYPE_CHECKING:
    from awq_ao.config import AWQConfig


def _bad(field_name: str, value: object, accepted: str) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    kind = "bool" if isinstance(value, bool) else type(value).__name__
    return ValueError(f"awq_config: {field_name}={shown} ({kind}) is not valid; accepted: {accepted}.")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))


def _int_at_least(cfg: AWQConfig, name: str, lo: int, none_ok: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and none_ok:
        return
    if not _is_int(v) or v < lo:
        raise _bad(name, v, f"an integer >= {lo}" + (" or None" if none_ok else ""))
    setattr(cfg, name, int(v))


def _choice(cfg: AWQConfig, name: str, allowed: tuple[object, ...]) -> None:
    v = getattr(cfg, name)
    # exact type match: 1 == True and 1.0 == 1 must not pass for True / 1
    if not any(type(v) is type(a) and v == a for a in allowed):
        raise _bad(name, v, " or ".join(repr(a) for a in allowed))


def _names(cfg: AWQConfig, name: str, none_ok: bool) -> None:
    v = getattr(cfg, name)
    if v is None and none_ok:
        return
    if isinstance(v, str):
        v = (v,)  # one pattern, not its characters
    try:
        items = tuple(v)  # type: ignore[arg-type]
    except TypeError:
        items = None
    if items is None or not all(isinstance(x, str) for x in items):
        raise _bad(name, getattr(cfg, name), "a module name pattern (str) or a list of them" + (", or None" if none_ok else ""))
    setattr(cfg, name, items)


def _caller_outside_package() -> int:
    """``stacklevel`` of the innermost frame outside awq_ao, for its caller's ``warnings.warn``.

    The warning then points at the user's ``awq_config(...)`` / ``AWQConfig(...)`` /
    ``awq_ao.quantize(...)`` line, whichever way the config was built.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)  # level 1: the function calling warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level += 1
        frame = frame.f_back
    return level


def validate(cfg: AWQConfig) -> None:
    """Check every :class:`AWQConfig` option; the message names it and what it accepts.

    The one place options are checked, whichever way they were given: options are read and
    normalised (``skip="x"`` -> ``("x",)``, ``device`` -> its ``str``) through their flat names,
    which is also the name every message shows. The groups must be the group classes.

    Integers must be integers (``4.0``, ``"4"`` and ``True`` are refused, not coerced), flags
    must be booleans, and the string options one of their listed values.
    """
    _choice(cfg, "step", ("prepare", "convert"))
    for gname, cls in GROUPS.items():
        if type(getattr(cfg, gname)) is not cls:
            raise _bad(gname, getattr(cfg, gname), f"a {cls.__name__} (from awq_ao.config)")
    if not _is_int(cfg.bits) or int(cfg.bits) not in SUPPORTED_BITS:
        raise _bad("bits", cfg.bits, f"an integer in {', '.join(map(str, SUPPORTED_BITS))}")
    cfg.bits = int(cfg.bits)
    if not _is_int(cfg.group_size) or not (cfg.group_size == -1 or cfg.group_size >= 1):
        raise _bad("group_size", cfg.group_size, "an integer >= 1, or -1 for one group per output row")
    cfg.group_size = int(cfg.group_size)
    for name in ("zero_point", "scale_search", "search_refine", "clip", "clip_qk", "clip_after_rounding", "gptq_act_order", "gptq_float_target", "gptq_shared_factor",
                 "split_blocks", "experts", "progress", "verbose"):
        _choice(cfg, name, (True, False))
    _int_at_least(cfg, "n_grid", 1)
    _int_at_least(cfg, "clip_grid", 1)
    _int_at_least(cfg, "max_search_samples", 1)
    _int_at_least(cfg, "max_gram_samples", 1)
    _int_at_least(cfg, "gptq_refit_rounds", 0)
    _int_at_least(cfg, "block_refine_steps", 0)
    _int_at_least(cfg, "block_refine_batch", 1)
    _int_at_least(cfg, "clip_tokens", 1, none_ok=True)
    _int_at_least(cfg, "screen_rows", 1, none_ok=True)
    _int_at_least(cfg, "screen_keep", 1, none_ok=True)
    if not _is_int(cfg.seed):
        raise _bad("seed", cfg.seed, "an integer")
    if cfg.seed != 0:
        warnings.warn("awq_config: seed has no effect (convert is deterministic); drop it.",
                      stacklevel=_caller_outside_package())
    _choice(cfg, "duo_scaling", (True, False, "both"))
    _choice(cfg, "clip_mode", ("range", "asymmetric", "symmetric"))
    _choice(cfg, "rounding", ("nearest", "gptq"))
    _choice(cfg, "search_loss", ("module", "linear", "attention"))
    _choice(cfg, "search_rounding", ("auto", "nearest", "gptq"))
    if cfg.search_rounding == "gptq" and cfg.rounding != "gptq":
        raise ValueError(
            "awq_config: search_rounding='gptq' scores candidates after error-feedback rounding, which "
            "needs the full input Grams of rounding='gptq'; pass rounding='gptq' or search_rounding='auto'."
        )
    _choice(cfg, "channel_stats", ("calibration", "sample"))
    if cfg.clip_after_rounding and (cfg.rounding != "gptq" or not cfg.clip or cfg.gptq_refit_rounds):
        warnings.warn(
            "awq_config: clip_after_rounding=True has no effect here: it chooses each row's clipping after "
            "error-feedback rounding, so it needs rounding='gptq', clip=True and gptq_refit_rounds=0 (got "
            f"rounding={cfg.rounding!r}, clip={cfg.clip}, gptq_refit_rounds={cfg.gptq_refit_rounds}).",
            stacklevel=_caller_outside_package(),
        )
    if cfg.gptq_float_target and (cfg.rounding != "gptq" or cfg.sequential is False):
        warnings.warn(
            "awq_config: gptq_float_target=True has no effect here: it shifts the error-feedback rounding's "
            "target in layer-by-layer mode, so it needs rounding='gptq' and sequential=True or 'auto' (got "
            f"rounding={cfg.rounding!r}, sequential={cfg.sequential!r}).",
            stacklevel=_caller_outside_package(),
        )
    elif cfg.gptq_float_target:
        warnings.warn(
            "awq_config: gptq_float_target=True is experimental and measured much worse (SmolLM2 INT4 g128: "
            "perplexity 1491 against 23.05 without it): o_proj/down_proj over-correct, and the other linears' "
            "shifts overfit the calibration tokens (docs/results.md, session 25); do not use it on real models.",
            stacklevel=_caller_outside_package(),
        )
    if cfg.block_refine_steps and cfg.sequential is False:
        warnings.warn(
            "awq_config: block_refine_steps has no effect with sequential=False: it tunes each block on its "
            "output in layer-by-layer mode; pass sequential=True or 'auto', or drop it.",
            stacklevel=_caller_outside_package(),
        )
    _choice(cfg, "fallback", ("multiply", "skip"))
    _choice(cfg, "on_capture_error", ("raise", "hook_only"))
    _choice(cfg, "sequential", (True, False, "auto"))
    _choice(cfg, "head", ("keep", "int8"))
    if not _is_real(cfg.max_shrink) or not 0.0 <= cfg.max_shrink < 1.0:
        raise _bad("max_shrink", cfg.max_shrink, "a number in [0, 1)")
    for name in ("gptq_damp", "max_gram_gib", "block_refine_lr"):
        v = getattr(cfg, name)
        if not _is_real(v) or not v > 0:
            raise _bad(name, v, "a number > 0")
    _names(cfg, "skip", none_ok=False)
    _names(cfg, "include", none_ok=True)
    if cfg.device is not None:
        import torch

        if not isinstance(cfg.device, (str, torch.device)):
            raise _bad("device", cfg.device, "None or a device name such as 'cpu', 'cuda', 'cuda:1'")
        try:
            cfg.device = str(torch.device(cfg.device))
        except (RuntimeError, ValueError) as e:
            raise _bad("device", cfg.device, "None or a device name such as 'cpu', 'cuda', 'cuda:1'") from e
    if cfg.spill_dir is not None:
        if not isinstance(cfg.spill_dir, (str, os.PathLike)):
            raise _bad("spill_dir", cfg.spill_dir, "None or a directory path")
        if cfg.sequential is False:
            raise ValueError("awq_config: spill_dir only applies to layer-by-layer convert (sequential=True or 'auto').")
        cfg.spill_dir = os.fspath(cfg.spill_dir)
