"""The torchao configuration object for awq_ao and its ``quantize_`` handler."""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from awq_ao.lowering.quant_math import SUPPORTED_BITS

Step = Literal["prepare", "convert"]


@dataclass
class AWQConfig(AOBaseConfig):
    """Settings for one awq_ao prepare or convert step (build it with :func:`awq_config`).

    Attributes:
        step: ``"prepare"`` attaches observers; ``"convert"`` searches, folds and quantizes.
        bits: weight bit width (2..8; 4 is the main target, 3 is supported by the same path).
        group_size: quantization group length along in_features, or -1 for per channel.
            in_features need not be a multiple: the last group is simply shorter.
        zero_point: asymmetric (True) or symmetric (False) quantization.
        n_grid: grid points for the scale exponent alpha in [0, 1).
        duo_scaling: include the weight-magnitude term in the scale (AutoAWQ's duo scaling);
            ``"both"`` searches the candidates with and without it (twice the search time).
        scale_search: run the AWQ scale search (False = no scaling: round-to-nearest).
        search_refine: try every second alpha of the grid, then the two neighbours of the
            best of those (13 of 21 candidates at ``n_grid=20``) instead of every grid
            point; same optimum wherever the loss is unimodal in alpha at that scale.
        search_loss: what a candidate scale is scored on. ``"module"`` (AutoAWQ's
            ``module2inspect``): the output of the smallest module enclosing the group's
            consumers (the attention for q/k/v, the MLP for gate/up), run on the search
            sample for every candidate. ``"linear"``: the consumers' own output error,
            computed from their input's Gram (``N K^2`` multiply-adds per candidate instead
            of a module forward over every token); the softmax and the MLP's gating are not
            seen. Groups whose enclosing module is the consumer itself score the same either way.
        clip: run the per-group weight clipping search.
        clip_grid / max_shrink: clipping search grid (ratios 1 - i/clip_grid, i < max_shrink*grid).
        clip_qk: also clip the linears feeding attention queries and keys (found in the
            graph). Off by default, as in AutoAWQ: their error is amplified by the softmax,
            which a per-linear output loss does not see.
        clip_mode: ``"range"`` shrinks a group's [min, max] range toward 0 (suits asymmetric
            quantization); ``"asymmetric"`` also refines the lower and upper ends separately
            (3x the clipping search time); ``"symmetric"`` clamps to ±r·max|w| as AutoAWQ does.
        rounding: how codes are chosen on each group's (scale, zero) grid after scaling and
            clipping: ``"gptq"`` (default): column by column with the rounding error
            compensated by the later columns through the inputs' Gram (the GPTQ update, the
            grid kept fixed); ``"nearest"``: plain AWQ. Same storage, kernels and formats
            either way. ``"gptq"`` keeps one ``[K, K]`` float32 Gram per distinct linear
            input until its linears are quantized: one block's in layer-by-layer mode,
            the whole model's with ``sequential=False`` (which then checks the total
            against ``max_gram_gib`` before it starts).
        gptq_damp: relative diagonal damping of the Gram for ``rounding="gptq"``, chosen on
            held-out validation perplexity (see the settings sweep in docs/results.md).
        max_gram_gib: with ``sequential=False`` and ``rounding="gptq"``, the most memory
            (GiB) the whole model's Grams may take; convert refuses beyond it and names the
            fixes (layer-by-layer mode, or ``rounding="nearest"``).
        gptq_act_order: with ``rounding="gptq"``, round columns in order of decreasing
            input energy (each keeps its group's grid).
        max_search_samples: bound on calibration memory: at most this many batch rows (e.g.
            sequences) of the calibration calls are kept for the search; statistics still use
            every calibration batch.
        clip_tokens: tokens of the search sample used by each layer's clipping search
            (None: all of them). Only their per-group Gram ``[K/g, g, g]`` is kept, so
            this bounds time, not memory.
        skip: fnmatch patterns of module names kept in full precision. The output head
            (a linear feeding the logits or sharing the embedding weight) is always skipped.
        include: if given, only modules matching one of these patterns are quantized.
        fallback: what to do where no fold is legal: ``"multiply"`` inserts an explicit
            per-channel input multiply (counted in the report), ``"skip"`` leaves the group
            unscaled (plain RTN for its linears).
        on_capture_error: if torch.export cannot capture the model: ``"raise"`` a
            CaptureError naming the failing op, or ``"hook_only"``: continue with groups found
            by hooks (norm -> consumers folds, each checked numerically; others multiply).
        sequential: layer-by-layer convert: one decoder block at a time (inputs cached,
            search, fold, quantize, then the quantized block's outputs feed the next block).
            Peak activation memory is one block's, independent of depth. ``"auto"``
            (default): layer by layer when one stack of repeated blocks (an ``nn.ModuleList``
            of identical layers, as in transformers decoders) holds every linear to quantize,
            else the whole model at once; the report's ``mode`` says which.
            ``False`` always searches the whole model at once.
        split_blocks: in sequential mode, search a block's sub-blocks one after the other
            (attention, then MLP): each is searched on the outputs of the already
            quantized ones. Blocks that cannot be split (parallel attention/MLP, MoE) are
            searched whole. Off by default: on SmolLM2 INT4 g64 it measured 23.185 vs
            23.164 perplexity unsplit, at a third more search time.
        spill_dir: sequential mode only: after each block, write the full-precision
            originals its quantization replaced (kept only so a failure can restore the
            model) to a temporary folder inside this directory and free them, so resident
            memory falls block by block instead of holding the whole full-precision model
            next to its INT4 copy. Needs free disk about the size of the quantized linears
            in full precision; the files are deleted when convert ends. A rollback reads them
            back (restored weights are new Parameter objects with the same values).
            None keeps the originals in memory.
        device: compute device for sequential mode (e.g. "cuda"): each block is moved there
            for its step and back afterwards; the cached activations stay on the CPU.
            None keeps every block where it is.
        experts: also quantize the 3-D expert weights of transformers MoE blocks (modules
            using ``use_experts_implementation``): per-expert AWQ scales searched on the tokens
            each expert receives, the block input scale folded into the norm and the router.
        seed: has no effect (convert makes no random choice: the search, clipping and
            rounding are deterministic); kept so that existing calls still build. A value
            other than 0 warns.
        progress: show progress bars.
        verbose: print the report after convert.
    """

    step: Step = "convert"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    duo_scaling: bool | Literal["both"] = True
    scale_search: bool = True
    search_refine: bool = False
    search_loss: Literal["module", "linear"] = "module"
    clip: bool = True
    clip_grid: int = 40
    clip_mode: Literal["range", "asymmetric", "symmetric"] = "asymmetric"
    max_shrink: float = 0.5
    clip_qk: bool = False
    rounding: Literal["nearest", "gptq"] = "gptq"
    gptq_damp: float = 0.1
    gptq_act_order: bool = False
    max_gram_gib: float = 4.0
    max_search_samples: int = 16
    clip_tokens: int | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)
    include: tuple[str, ...] | None = None
    fallback: Literal["multiply", "skip"] = "multiply"
    on_capture_error: Literal["raise", "hook_only"] = "raise"
    sequential: bool | Literal["auto"] = "auto"
    device: str | None = None
    split_blocks: bool = False
    spill_dir: str | None = None
    experts: bool = True
    seed: int = 0
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether convert needs observed activations."""
        return self.scale_search or self.clip


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


def _validate(cfg: AWQConfig) -> None:
    """Check every :class:`AWQConfig` field; the message names the field and what it accepts.

    Integers must be integers (``4.0``, ``"4"`` and ``True`` are refused, not coerced), flags
    must be booleans, and the string options one of their listed values.
    """
    _choice(cfg, "step", ("prepare", "convert"))
    if not _is_int(cfg.bits) or int(cfg.bits) not in SUPPORTED_BITS:
        raise _bad("bits", cfg.bits, f"an integer in {', '.join(map(str, SUPPORTED_BITS))}")
    cfg.bits = int(cfg.bits)
    if not _is_int(cfg.group_size) or not (cfg.group_size == -1 or cfg.group_size >= 1):
        raise _bad("group_size", cfg.group_size, "an integer >= 1, or -1 for one group per output row")
    cfg.group_size = int(cfg.group_size)
    for name in ("zero_point", "scale_search", "search_refine", "clip", "clip_qk", "gptq_act_order",
                 "split_blocks", "experts", "progress", "verbose"):
        _choice(cfg, name, (True, False))
    _int_at_least(cfg, "n_grid", 1)
    _int_at_least(cfg, "clip_grid", 1)
    _int_at_least(cfg, "max_search_samples", 1)
    _int_at_least(cfg, "clip_tokens", 1, none_ok=True)
    if not _is_int(cfg.seed):
        raise _bad("seed", cfg.seed, "an integer")
    if cfg.seed != 0:
        import warnings

        warnings.warn("awq_config: seed has no effect (convert is deterministic); drop it.", stacklevel=4)
    _choice(cfg, "duo_scaling", (True, False, "both"))
    _choice(cfg, "clip_mode", ("range", "asymmetric", "symmetric"))
    _choice(cfg, "rounding", ("nearest", "gptq"))
    _choice(cfg, "search_loss", ("module", "linear"))
    _choice(cfg, "fallback", ("multiply", "skip"))
    _choice(cfg, "on_capture_error", ("raise", "hook_only"))
    _choice(cfg, "sequential", (True, False, "auto"))
    if not _is_real(cfg.max_shrink) or not 0.0 <= cfg.max_shrink < 1.0:
        raise _bad("max_shrink", cfg.max_shrink, "a number in [0, 1)")
    for name in ("gptq_damp", "max_gram_gib"):
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


def awq_config(step: Step = "convert", **kwargs: object) -> AWQConfig:
    """Build an :class:`AWQConfig` for torchao's ``quantize_``.

    Example::

        quantize_(model, awq_config(step="prepare", bits=4, group_size=128), filter_fn=whole_model)
        for batch in calibration: model(batch)
        quantize_(model, awq_config(bits=4, group_size=128), filter_fn=whole_model)
    """
    return AWQConfig(step=step, **kwargs)  # type: ignore[arg-type]


def whole_model(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for torchao's ``quantize_`` that selects the model itself, nothing inside.

    ``quantize_(model, awq_config(...), filter_fn=whole_model)`` calls awq_ao's handler once,
    on ``model``: AWQ needs the whole graph (scale groups span norms and linears), so the
    handler works on the root it is given.
    """
    return fqn == ""


def _enclosing_quantize_model(module: nn.Module) -> nn.Module:
    """The ``model`` argument of the running ``quantize_`` call (default ``filter_fn`` only).

    With torchao's default filter, ``quantize_`` hands the handler one linear at a time and
    never the model; this looks the model up in ``quantize_``'s own frame, once per call of
    the handler. Every path inside awq_ao (``awq_ao.quantize``, the CLI) passes
    ``filter_fn=whole_model`` instead and never gets here.
    """
    from torchao.quantization import quant_api

    code = quant_api.quantize_.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            model = frame.f_locals.get("model")
            return model if isinstance(model, nn.Module) else module
        frame = frame.f_back
    return module


@register_quantize_module_handler(AWQConfig)
def _awq_transform(module: nn.Module, config: AWQConfig) -> nn.Module:
    """torchao handler: prepare or convert the model ``module`` (see :func:`whole_model`).

    Given a model (``filter_fn=whole_model``), it runs prepare or convert on it and returns
    it. Given a linear
    (torchao's default filter calls the handler once per ``nn.Linear``), the first call does
    the work on the whole model of that ``quantize_`` call and every call returns the
    module that replaced its linear.
    """
    from awq_ao.lowering.swap import is_quantizable_linear
    from awq_ao.observers.attach import prepare
    from awq_ao.passes.convert import convert
    from awq_ao.state import get_state

    if not is_quantizable_linear(module):
        if config.step == "prepare":
            prepare(module, config)
        else:
            convert(module, config)
        return module
    root = _enclosing_quantize_model(module)
    state = get_state(root)
    if config.step == "prepare":  # once per quantize_ call: the config object marks the call
        if state is None or state.phase != "prepared" or state.prepare_token is not config:
            prepare(root, config, token=config)
        return module
    if state is None or state.convert_token is not config:
        convert(root, config, token=config)
        state = get_state(root)
    assert state is not None
    return state.replacements.get(id(module), module)
