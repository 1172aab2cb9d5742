"""The torchao configuration object for awq_ao and its ``quantize_`` handler.

The options are grouped: :class:`WeightFormat` (what is stored), :class:`SearchOptions` (the
AWQ scale search), :class:`ClipOptions` (the weight clipping search), :class:`RoundingOptions`
(how codes are chosen), :class:`Selection` (which modules) and :class:`Execution` (how convert
runs). :class:`AWQConfig` holds one of each, plus ``step`` and ``seed``. The groups are
defined in :mod:`awq_ao.options` and re-exported here.

Two equivalent ways to build a config::

    awq_config(bits=3, group_size=64, clip=False)                     # flat keywords
    awq_config(weight_format=WeightFormat(bits=3, group_size=64),     # groups
               clip_options=ClipOptions(enabled=False))

A group's keyword (and attribute) is its class name in snake_case; no group keyword is also a
flat keyword, so ``clip`` stays the clipping on/off flag and ``rounding`` the rounding method.
Every flat name also stays an attribute: ``cfg.clip_grid`` reads ``cfg.clip_options.grid``,
and ``cfg.clip_grid = 20`` replaces ``cfg.clip_options`` by a copy with ``grid=20`` (the
groups are frozen, so configs never share a mutable part). Validation happens once, when an
:class:`AWQConfig` is built, and its messages name the flat keyword (``clip_grid=0 ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from awq_ao.config_checks import validate

# the option groups live in awq_ao.options; importing them here also re-exports them
from awq_ao.options import (
    GROUPS,
    ChannelStats,
    ClipMode,
    ClipOptions,
    DuoScaling,
    Execution,
    Fallback,
    HeadMode,
    OnCaptureError,
    Rounding,
    RoundingOptions,
    SearchLoss,
    SearchOptions,
    SearchRounding,
    Selection,
    Sequential,
    WeightFormat,
    _Flat,
)

Step = Literal["prepare", "convert"]


class _Default:
    """Marks an ``AWQConfig`` argument that was not passed."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()


@dataclass(init=False)
class AWQConfig(AOBaseConfig):
    """Settings for one awq_ao prepare or convert step (build it with :func:`awq_config`).

    Fields (compared by ``==``, shown by ``repr``, listed by ``dataclasses.fields``):

    Attributes:
        step: ``"prepare"`` attaches observers; ``"convert"`` (default) searches, folds and
            quantizes.
        weight_format: :class:`WeightFormat` (bits, group_size, zero_point).
        search_options: :class:`SearchOptions` (the AWQ scale search).
        clip_options: :class:`ClipOptions` (the weight clipping search).
        rounding_options: :class:`RoundingOptions` (nearest or error-feedback rounding).
        selection: :class:`Selection` (which modules are quantized).
        execution: :class:`Execution` (mode, device, memory, output).
        seed: has no effect (convert makes no random choice: the search, clipping and
            rounding are deterministic); kept so that existing calls still build. Default 0;
            another value warns.

    Every option of a group also has a flat name, accepted as a keyword and readable and
    writable as an attribute (the defaults are stated once, in the group's docstring):

    ===================  ================================
    flat name            group field
    ===================  ================================
    bits                 ``weight_format.bits``
    group_size           ``weight_format.group_size``
    zero_point           ``weight_format.zero_point``
    scale_search         ``search_options.enabled``
    n_grid               ``search_options.n_grid``
    duo_scaling          ``search_options.duo_scaling``
    search_refine        ``search_options.refine``
    screen_rows          ``search_options.screen_rows``
    screen_keep          ``search_options.screen_keep``
    search_loss          ``search_options.loss``
    search_rounding      ``search_options.rounding``
    max_search_samples   ``search_options.max_samples``
    max_gram_samples     ``search_options.max_gram_samples``
    channel_stats        ``search_options.channel_stats``
    fallback             ``search_options.fallback``
    clip                 ``clip_options.enabled``
    clip_grid            ``clip_options.grid``
    clip_mode            ``clip_options.mode``
    max_shrink           ``clip_options.max_shrink``
    clip_qk              ``clip_options.qk``
    clip_tokens          ``clip_options.tokens``
    clip_after_rounding  ``clip_options.after_rounding``
    rounding             ``rounding_options.method``
    gptq_damp            ``rounding_options.damp``
    gptq_act_order       ``rounding_options.act_order``
    gptq_shared_factor   ``rounding_options.shared_factor``
    gptq_refit_rounds    ``rounding_options.refit_rounds``
    gptq_float_target    ``rounding_options.float_target``
    block_refine_steps   ``rounding_options.refine_steps``
    block_refine_lr      ``rounding_options.refine_lr``
    block_refine_batch   ``rounding_options.refine_batch``
    max_gram_gib         ``rounding_options.max_gram_gib``
    skip                 ``selection.skip``
    include              ``selection.include``
    experts              ``selection.experts``
    head                 ``selection.head``
    sequential           ``execution.sequential``
    device               ``execution.device``
    split_blocks         ``execution.split_blocks``
    spill_dir            ``execution.spill_dir``
    on_capture_error     ``execution.on_capture_error``
    progress             ``execution.progress``
    verbose              ``execution.verbose``
    ===================  ================================

    A call may mix groups and flat keywords of *other* groups
    (``AWQConfig(weight_format=WeightFormat(bits=3), clip=False)``); a flat keyword together
    with its own group (``bits=3`` and ``weight_format=...``) is refused as ambiguous. So
    ``dataclasses.replace`` takes field names (``step``, the groups, ``seed``); to change one
    option of a built config, copy it and set the flat name (``c = copy.copy(cfg);
    c.bits = 3``), as before. Like before, attribute writes are not validated.
    """

    step: Step = "convert"
    weight_format: WeightFormat = field(default_factory=WeightFormat)
    search_options: SearchOptions = field(default_factory=SearchOptions)
    clip_options: ClipOptions = field(default_factory=ClipOptions)
    rounding_options: RoundingOptions = field(default_factory=RoundingOptions)
    selection: Selection = field(default_factory=Selection)
    execution: Execution = field(default_factory=Execution)
    seed: int = 0

    # flat names (not dataclass fields: no annotations), in the table's order
    bits = _Flat[int]("weight_format", "bits")
    group_size = _Flat[int]("weight_format", "group_size")
    zero_point = _Flat[bool]("weight_format", "zero_point")
    scale_search = _Flat[bool]("search_options", "enabled")
    n_grid = _Flat[int]("search_options", "n_grid")
    duo_scaling = _Flat[DuoScaling]("search_options", "duo_scaling")
    search_refine = _Flat[bool]("search_options", "refine")
    screen_rows = _Flat[int | None]("search_options", "screen_rows")
    screen_keep = _Flat[int | None]("search_options", "screen_keep")
    search_loss = _Flat[SearchLoss]("search_options", "loss")
    search_rounding = _Flat[SearchRounding]("search_options", "rounding")
    max_search_samples = _Flat[int]("search_options", "max_samples")
    max_gram_samples = _Flat[int]("search_options", "max_gram_samples")
    channel_stats = _Flat[ChannelStats]("search_options", "channel_stats")
    fallback = _Flat[Fallback]("search_options", "fallback")
    clip = _Flat[bool]("clip_options", "enabled")
    clip_grid = _Flat[int]("clip_options", "grid")
    clip_mode = _Flat[ClipMode]("clip_options", "mode")
    max_shrink = _Flat[float]("clip_options", "max_shrink")
    clip_qk = _Flat[bool]("clip_options", "qk")
    clip_tokens = _Flat[int | None]("clip_options", "tokens")
    clip_after_rounding = _Flat[bool]("clip_options", "after_rounding")
    rounding = _Flat[Rounding]("rounding_options", "method")
    gptq_damp = _Flat[float]("rounding_options", "damp")
    gptq_act_order = _Flat[bool]("rounding_options", "act_order")
    gptq_shared_factor = _Flat[bool]("rounding_options", "shared_factor")
    gptq_refit_rounds = _Flat[int]("rounding_options", "refit_rounds")
    gptq_float_target = _Flat[bool]("rounding_options", "float_target")
    block_refine_steps = _Flat[int]("rounding_options", "refine_steps")
    block_refine_lr = _Flat[float]("rounding_options", "refine_lr")
    block_refine_batch = _Flat[int]("rounding_options", "refine_batch")
    max_gram_gib = _Flat[float]("rounding_options", "max_gram_gib")
    skip = _Flat[tuple[str, ...]]("selection", "skip")
    include = _Flat[tuple[str, ...] | None]("selection", "include")
    experts = _Flat[bool]("selection", "experts")
    head = _Flat[HeadMode]("selection", "head")
    sequential = _Flat[Sequential]("execution", "sequential")
    device = _Flat[str | None]("execution", "device")
    split_blocks = _Flat[bool]("execution", "split_blocks")
    spill_dir = _Flat[str | None]("execution", "spill_dir")
    on_capture_error = _Flat[OnCaptureError]("execution", "on_capture_error")
    progress = _Flat[bool]("execution", "progress")
    verbose = _Flat[bool]("execution", "verbose")

    def __init__(
        self,
        step: Step = _DEFAULT,
        *,
        weight_format: WeightFormat = _DEFAULT,
        search_options: SearchOptions = _DEFAULT,
        clip_options: ClipOptions = _DEFAULT,
        rounding_options: RoundingOptions = _DEFAULT,
        selection: Selection = _DEFAULT,
        execution: Execution = _DEFAULT,
        seed: int = _DEFAULT,
        **flat: Any,
    ) -> None:
        """Build and validate a config from groups and/or flat keywords (see the class doc)."""
        given = {"weight_format": weight_format, "search_options": search_options,
                 "clip_options": clip_options, "rounding_options": rounding_options,
                 "selection": selection, "execution": execution}
        for name in flat:
            if name not in FLAT_NAMES:
                close = difflib.get_close_matches(name, [*FLAT_NAMES, *GROUPS, "step", "seed"], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"AWQConfig.__init__() got an unexpected keyword argument {name!r}{hint}")
        defaults = {f.name: f for f in dataclasses.fields(self)}
        self.step = defaults["step"].default if step is _DEFAULT else step  # type: ignore[assignment]
        self.seed = defaults["seed"].default if seed is _DEFAULT else seed  # type: ignore[assignment]
        for gname, cls in GROUPS.items():
            mine = {f: flat[f] for f in flat if FLAT_NAMES[f][0] == gname}
            if given[gname] is _DEFAULT:
                renamed = {FLAT_NAMES[f][1]: v for f, v in mine.items()}
                setattr(self, gname, cls(**renamed))
            elif mine:
                names = ", ".join(f"{f}=" for f in mine)
                which = "is a field" if len(mine) == 1 else "are fields"
                raise TypeError(
                    f"awq_config: {gname}= and {names} both given, but {names} {which} of {gname} "
                    f"({cls.__name__}); set {'it' if len(mine) == 1 else 'them'} inside "
                    f"{cls.__name__}(...) or drop {gname}=."
                )
            else:
                setattr(self, gname, given[gname])
        validate(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether convert needs observed activations."""
        return self.scale_search or self.clip

    @property
    def refine_steps(self) -> int:
        """Block-refinement steps this config runs: ``block_refine_steps``, or 0 where convert
        needs no calibration (no sample to tune on) or runs whole-model (``sequential=False``)."""
        return self.block_refine_steps if self.needs_calibration and self.sequential is not False else 0

    def flat_dict(self) -> dict[str, Any]:
        """Every option under its flat name (``step``, the table's names, ``seed``).

        ``AWQConfig(**cfg.flat_dict()) == cfg``; handy for logging or JSON (``skip`` and
        ``include`` are tuples).
        """
        out: dict[str, Any] = {"step": self.step}
        out.update({name: getattr(self, name) for name in FLAT_NAMES})
        out["seed"] = self.seed
        return out

    def summary(self) -> str:
        """A short multi-line text of the config, one line per group."""
        lines = [f"AWQConfig step={self.step!r} seed={self.seed!r}"]
        for gname in GROUPS:
            group = getattr(self, gname)
            values = " ".join(f"{f.name}={getattr(group, f.name)!r}" for f in dataclasses.fields(group))
            lines.append(f"  {gname}: {values}")
        return "\n".join(lines)


#: flat name -> (group keyword, field of that group), in the documented order
FLAT_NAMES: dict[str, tuple[str, str]] = {
    name: (attr.group, attr.name) for name, attr in vars(AWQConfig).items() if isinstance(attr, _Flat)
}


def awq_config(step: Step = "convert", **kwargs: object) -> AWQConfig:
    """Build an :class:`AWQConfig` for torchao's ``quantize_``.

    ``kwargs`` are flat option keywords (``bits=3``, ``clip=False``, ...), option groups
    (``weight_format=WeightFormat(bits=3)``, ``clip_options=ClipOptions(grid=20)``, ...) or
    both, for different groups; see :class:`AWQConfig`.

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


@register_quantize_module_handler(AWQConfig)
def _awq_transform(module: nn.Module, config: AWQConfig) -> nn.Module:
    """torchao handler: prepare or convert the model ``module`` it is given and return it.

    ``quantize_(model, awq_config(...), filter_fn=whole_model)`` calls it once, on ``model``
    (see :func:`whole_model`). torchao's default filter would call it once per ``nn.Linear``
    without ever showing it the model, and AWQ cannot work on a linear alone: that call is
    refused before anything changes.
    """
    from awq_ao.lowering.swap import is_quantizable_linear
    from awq_ao.observers.attach import prepare
    from awq_ao.passes.convert import convert

    if is_quantizable_linear(module):
        raise ValueError(
            f"awq_config(step={config.step!r}) was handed one {type(module).__name__}, not the model: "
            "torchao's default filter_fn calls the handler once per linear, but AWQ's scale groups "
            "span norms and linears, so awq_ao needs the whole model. Pass filter_fn=awq_ao.whole_model: "
            "quantize_(model, awq_config(...), filter_fn=whole_model) (or use awq_ao.quantize(model, "
            "calibration)). Nothing was changed."
        )
    if config.step == "prepare":
        prepare(module, config)
    else:
        convert(module, config)
    return module
