"""AWQConfig's option groups: six frozen dataclasses, one per concern.

:class:`WeightFormat` (what is stored), :class:`SearchOptions` (the AWQ scale search),
:class:`ClipOptions` (the weight clipping search), :class:`RoundingOptions` (how codes are
chosen), :class:`Selection` (which modules) and :class:`Execution` (how convert runs). Each
documents its fields and their defaults; :class:`~awq_ao.config.AWQConfig` holds one of each
(plus ``step`` and ``seed``) and validates them. :data:`GROUPS` maps each group's keyword to
its class, and :class:`_Flat` is the descriptor that gives AWQConfig its flat option names.

These are plain records with no dependencies beyond the standard library; they are
re-exported by :mod:`awq_ao.config` and by the package (``from awq_ao import WeightFormat``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

DuoScaling = bool | Literal["both"]
SearchLoss = Literal["module", "linear", "attention"]
SearchRounding = Literal["auto", "nearest", "gptq"]
ChannelStats = Literal["calibration", "sample"]
Fallback = Literal["multiply", "skip"]
ClipMode = Literal["range", "asymmetric", "symmetric"]
Rounding = Literal["nearest", "gptq"]
OnCaptureError = Literal["raise", "hook_only"]
Sequential = bool | Literal["auto"]
HeadMode = Literal["keep", "int8"]

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# option groups (plain records: AWQConfig validates them, see awq_ao.config_checks.validate)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WeightFormat:
    """How the quantized weights are stored.

    Attributes:
        bits: weight bit width, 2..8; 4 is the main target, 3 is supported by the same path.
            Default 4. (Flat keyword ``bits``.)
        group_size: quantization group length along in_features, or -1 for one group per
            output row. in_features need not be a multiple: the last group is simply shorter.
            Default 128. (Flat ``group_size``.)
        zero_point: asymmetric (True) or symmetric (False) quantization. Default True.
            (Flat ``zero_point``.)
    """

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """The AWQ per-input-channel scale search.

    Attributes:
        enabled: run the AWQ scale search (False = no scaling: round-to-nearest). Default
            True. (Flat ``scale_search``.)
        n_grid: grid points for the scale exponent alpha in [0, 1). Default 20.
            (Flat ``n_grid``.)
        duo_scaling: include the weight-magnitude term in the scale (AutoAWQ's duo scaling);
            ``"both"`` searches the candidates with and without it (twice the search time).
            Default True. (Flat ``duo_scaling``.)
        refine: try every second alpha of the grid, then the two neighbours of the best of
            those (13 of 21 candidates at ``n_grid=20``) instead of every grid point; same
            optimum wherever the loss is unimodal in alpha at that scale. Default False.
            (Flat ``search_refine``.)
        screen_rows: score the module loss by successive halving: every candidate on the
            first ``screen_rows`` rows of the search chunk, the best ``screen_keep`` on twice
            as many, half as many again on twice as many rows, and so on; the last survivors
            (and plain RTN) on every row, the winner chosen on that full loss. None scores
            every candidate on every row. Default 2 (4 before 2026-12-07: the same picks on
            SmolLM2, 9% less quantization time). Only groups scored on a module's output
            whose input carries the sample's rows are screened (``refine`` still cuts the
            grid of the others). (Flat ``screen_rows``.)
        screen_keep: candidates kept after the first screening stage. None (default): 12
            where the candidates are scored after error-feedback rounding, 20 (all) where
            they are rounded to nearest; the cheapest rules that picked the same scale as the
            full grid in every module-scored group of the offline replays (SmolLM2-135M INT4
            g64, 60 groups; Gemma 3 270M INT3 g64, 36 groups; ``devtools/search_rank_check.py``):
            candidates rounded with error feedback rank stably from fewer rows.
            (Flat ``screen_keep``.)
        loss: what a candidate scale is scored on. ``"module"`` (AutoAWQ's
            ``module2inspect``, the default): the output of the smallest module enclosing the
            group's consumers (the attention for q/k/v, the MLP for gate/up), run on the
            search sample for every candidate. ``"linear"``: the consumers' own output error,
            computed from their input's Gram (``N K^2`` multiply-adds per candidate instead of
            a module forward over every token); the softmax and the MLP's gating are not seen.
            ``"attention"``: the module's output for groups feeding attention queries or keys
            (the softmax seen), the linears' own outputs for every other group. Groups whose
            enclosing module is the consumer itself score the same every way.
            (Flat ``search_loss``.)
        rounding: how a candidate scale's weights are rounded when it is scored.
            ``"gptq"``: with error feedback on the search chunk's input Gram, as convert will
            round them (:mod:`awq_ao.passes.rounded_candidates`), every grid candidate once.
            Chosen on validation perplexity (SmolLM2 INT4 g64 24.444 vs 24.578, Gemma 3
            INT4 g128 56.720 vs 57.031), at more search time (577 vs 390 s on SmolLM2).
            ``refine`` does not cut the grid of Gram-scored groups in this mode. ``"nearest"``:
            round to nearest (AutoAWQ's search). ``"auto"`` (default): the same as the
            final ``rounding``. ``"gptq"`` needs ``rounding="gptq"`` (its full Grams).
            (Flat ``search_rounding``.)
        max_samples: batch rows (e.g. sequences) of the kept calibration sample that every
            candidate scale is scored on (the first ones); also the chunk size in which the
            rest of the sample is replayed. Default 16. (Flat ``max_search_samples``.)
        max_gram_samples: batch rows of the calibration calls kept for the input Grams of
            clipping and error-feedback rounding (and, layer by layer, carried through the
            blocks); they cost one extra forward per chunk, not one per candidate. At least
            ``max_samples`` rows are kept; the per-channel statistics use every calibration
            batch either way. Bounds calibration memory. MoE experts' Grams too (each
            expert's over the tokens routed to it in these rows).
            Default 64. (Flat ``max_gram_samples``.)
        channel_stats: where the per-channel mean ``|x|`` that shapes the candidate scales
            comes from. ``"calibration"`` (default): observers on every linear over every
            calibration batch of the float model. ``"sample"``: the search sample's own inputs
            to the group's linears (the first ``max_samples`` rows; layer by layer, the inputs
            after the blocks before were quantized), the statistics the candidates are then
            scored on; :func:`awq_ao.quantize` then skips the full-model calibration forward
            (it only records the batches; batches beyond ``max_gram_samples`` rows go unused).
            (Flat ``channel_stats``.)
        fallback: what to do where no fold is legal: ``"multiply"`` (default) inserts an
            explicit per-channel input multiply (counted in the report), ``"skip"`` leaves the
            group unscaled (plain RTN for its linears). (Flat ``fallback``.)
    """

    enabled: bool = True
    n_grid: int = 20
    duo_scaling: DuoScaling = True
    refine: bool = False
    screen_rows: int | None = 2
    screen_keep: int | None = None
    loss: SearchLoss = "module"
    rounding: SearchRounding = "auto"
    max_samples: int = 16
    max_gram_samples: int = 64
    channel_stats: ChannelStats = "calibration"
    fallback: Fallback = "multiply"


@dataclass(frozen=True, kw_only=True)
class ClipOptions:
    """The per-group weight clipping search.

    Attributes:
        enabled: run the clipping search. Default True. (Flat ``clip``.)
        grid: search grid: ratios ``1 - i/grid`` for ``i < max_shrink * grid``. Default 40.
            (Flat ``clip_grid``.)
        mode: ``"range"`` shrinks a group's [min, max] range toward 0 (suits asymmetric
            quantization); ``"asymmetric"`` (default) also refines the lower and upper ends
            separately (3x the clipping search time); ``"symmetric"`` clamps to ±r·max|w| as
            AutoAWQ does. (Flat ``clip_mode``.)
        max_shrink: the largest shrink searched, in [0, 1) (0 keeps every range: no
            clipping). Default 0.5. (Flat ``max_shrink``.)
        qk: also clip the linears feeding attention queries and keys (found in the graph).
            Default False, as in AutoAWQ: their error is amplified by the softmax, which a
            per-linear output loss does not see. (Flat ``clip_qk``.)
        tokens: tokens of the search sample used by each layer's clipping search; None (the
            default) uses all of them. Only their per-group Gram ``[K/g, g, g]`` is kept, so
            this bounds time, not memory. (Flat ``clip_tokens``.)
        after_rounding: with ``rounding="gptq"``, choose each output row's clipping after
            error-feedback rounding: the linear is rounded on its clipped grid, on a grid
            clipped half as much and on the unclipped grid (three sweeps sharing one
            factorization), and every row keeps the grid whose codes give the lowest output
            error through the input Gram. The clipping search itself scores round-to-nearest.
            Default False. (Flat ``clip_after_rounding``.)
    """

    enabled: bool = True
    grid: int = 40
    mode: ClipMode = "asymmetric"
    max_shrink: float = 0.5
    qk: bool = False
    tokens: int | None = None
    after_rounding: bool = False


@dataclass(frozen=True, kw_only=True)
class RoundingOptions:
    """How codes are chosen on each group's (scale, zero) grid after scaling and clipping.

    Attributes:
        method: ``"gptq"`` (default): column by column, with the rounding error compensated
            by the later columns through the inputs' Gram (the GPTQ update, the grid kept
            fixed); ``"nearest"``: plain AWQ. Same storage, kernels and formats either way.
            ``"gptq"`` keeps one ``[K, K]`` float32 Gram per distinct linear input until its
            linears are quantized: one block's in layer-by-layer mode, the whole model's with
            ``sequential=False`` (which then checks the total against ``max_gram_gib``
            before it starts). (Flat ``rounding``.)
        damp: relative diagonal damping of the Gram for ``method="gptq"``, chosen on
            held-out validation perplexity (see the settings sweep in docs/results.md).
            Default 0.1. (Flat ``gptq_damp``.)
        act_order: with ``method="gptq"``, round columns in order of decreasing input
            energy (each keeps its group's grid, so storage and kernels do not change).
            Default True: chosen on held-out validation perplexity (SmolLM2 INT4 g64: 24.558
            vs 25.081 without; docs/results.md). (Flat ``gptq_act_order``.)
        shared_factor: with ``method="gptq"``, damp the Gram and order its columns on the
            unscaled inputs ``x`` rather than on the scaled ``x / s``: the damped Gram of
            ``x / s`` is then ``D (H + lam I) D`` (``D = diag(1 / s)``), whose inverse factor is
            the unscaled one times ``diag(s)``. One factorization per linear input serves every
            AWQ candidate scale (the search otherwise factorizes a ``[K, K]`` matrix per
            candidate: ``21 K^3`` work per input, which dominates the search on wide models).
            Default False: measured worse on SmolLM2 INT4 g64 (validation 24.784 vs 24.584,
            test 22.510 vs 22.275); an option for wide models on CPU, where the
            per-candidate factorizations dominate the search time.
            (Flat ``gptq_shared_factor``.)
        refit_rounds: with ``method="gptq"``, once the codes are chosen, refit each group's
            scale by least squares on the same damped Gram (the zero points stay), round the
            codes again on the refit scales, and so on: this many refits
            (:func:`awq_ao.passes.scale_refit.alternate_grid`). Default 0 (the grid stays the
            clipped weight's). (Flat ``gptq_refit_rounds``.)
        float_target: with ``method="gptq"`` in layer-by-layer mode, round each linear toward
            the float model's output rather than its own output on the quantized model's
            inputs: the float blocks also run on the float model's own inputs, and each weight
            is shifted by ``W C H^-1`` before clipping and rounding (``C``: the cross Gram of
            the float and quantized inputs; :mod:`awq_ao.passes.float_target`), so the error
            the earlier blocks left is compensated too. One more float forward of the kept
            sample per block. Default False. Experimental: measured much worse
            (SmolLM2 INT4 g128: perplexity 1491 vs 23.05): ``o_proj``/``down_proj``
            over-correct (their cross Grams see q/k/v and gate/up still in float), and the
            other shifts lower the in-sample error but not the held-out one at 16k
            calibration tokens (docs/results.md, session 25; ``devtools/float_target_check.py``).
            ``awq_config`` warns. (Flat ``gptq_float_target``.)
        refine_steps: in layer-by-layer mode, after a block's linears are rounded and packed,
            tune their codes and scales jointly on the block's output against the float
            model's block output on its own stream, this many signed-gradient steps
            (:mod:`awq_ao.passes.block_refine`: an offset per code, a multiplier per group
            scale; kept only where it lowers the error on all calibration rows). Each step is
            a forward and backward of one block on ``refine_batch`` rows, so it adds about
            ``refine_steps`` training steps per block to the convert time; it needs autograd
            (convert refuses it under ``torch.inference_mode()``). Default 0 (off). On
            SmolLM2 INT3 g64, 32 steps gave 29.800 against 31.751 (a second calibration draw:
            29.974 against 31.801; 16 steps 31.677, 64 steps 31.146: more overfit), about
            +500 s on 2 cores; at INT4 g128 no test gain; on Gemma 3 270M INT3 g64 validation
            82.16 -> 67.98 but test 27.28 -> 28.46 (docs/results.md, sessions 26-27).
            (Flat ``block_refine_steps``.)
        refine_lr: the first step's size (in codes and in relative scale), decaying linearly
            to 0. Default 0.06. (Flat ``block_refine_lr``.)
        refine_batch: calibration rows per refinement step. Default 4.
            (Flat ``block_refine_batch``.)
        max_gram_gib: with ``sequential=False`` and ``method="gptq"``, the most memory (GiB)
            the whole model's Grams may take; convert refuses beyond it and names the fixes
            (layer-by-layer mode, or ``rounding="nearest"``). Default 4.0.
            (Flat ``max_gram_gib``.)
    """

    method: Rounding = "gptq"
    damp: float = 0.1
    act_order: bool = True
    shared_factor: bool = False
    refit_rounds: int = 0
    float_target: bool = False
    refine_steps: int = 0
    refine_lr: float = 0.06
    refine_batch: int = 4
    max_gram_gib: float = 4.0


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which modules are quantized.

    Attributes:
        skip: fnmatch patterns of module names kept in full precision (one pattern or a
            sequence; stored as a tuple). Default ``()``. The output head (a linear feeding
            the logits or sharing the embedding weight) is always skipped. (Flat ``skip``.)
        include: if given, only modules matching one of these patterns are quantized.
            Default None (every eligible module). (Flat ``include``.)
        experts: also quantize the 3-D expert weights of transformers MoE blocks (modules
            using ``use_experts_implementation``): per-expert AWQ scales searched on the
            tokens each expert receives, the block input scale folded into the norm and the
            router. Default True. (Flat ``experts``.)
        head: ``"keep"`` (default) leaves the output head in the model's dtype; ``"int8"``
            stores it with 8-bit row-wise codes (:class:`~awq_ao.lowering.int8_tensor.Int8RowWeightTensor`,
            ``8 + 32 / in_features`` bits per weight), and an input embedding tied to it reads the
            same codes. On CPU the head's decode matvec then runs a C++ kernel reading a quarter of
            float32's bytes. Not searched or scaled: plain round-to-nearest. (Flat ``head``.)
    """

    skip: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None
    experts: bool = True
    head: HeadMode = "keep"


@dataclass(frozen=True, kw_only=True)
class Execution:
    """How convert runs: mode, device, memory and output. None of it changes what the search
    optimises except ``split_blocks`` (which blocks' outputs a sub-block is searched on).

    Attributes:
        sequential: layer-by-layer convert: one decoder block at a time (inputs cached,
            search, fold, quantize, then the quantized block's outputs feed the next block).
            Peak activation memory is one block's, independent of depth. ``"auto"``
            (default): layer by layer when one stack of repeated blocks (an
            ``nn.ModuleList`` of identical layers, as in transformers decoders) holds every
            linear to quantize, else the whole model at once; the report's ``mode`` says
            which. ``True`` insists on layer by layer; ``False`` always searches the whole
            model at once. (Flat ``sequential``.)
        device: compute device for sequential mode (e.g. "cuda"): each block is moved there
            for its step and back afterwards; the cached activations stay on the CPU.
            Default None: every block stays where it is. (Flat ``device``.)
        split_blocks: in sequential mode, search a block's sub-blocks one after the other
            (attention, then MLP): each is searched on the outputs of the already quantized
            ones. Blocks that cannot be split (parallel attention/MLP, MoE) are searched
            whole. Default False: on SmolLM2 INT4 g64 it measured 23.185 vs 23.164
            perplexity unsplit, at a third more search time. (Flat ``split_blocks``.)
        spill_dir: sequential mode only: after each block, write the full-precision
            originals its quantization replaced (kept only so a failure can restore the
            model) to a temporary folder inside this directory and free them, so resident
            memory falls block by block instead of holding the whole full-precision model
            next to its INT4 copy. Needs free disk about the size of the quantized linears in
            full precision; the files are deleted when convert ends. A rollback reads them
            back (restored weights are new Parameter objects with the same values). Default
            None: the originals stay in memory. (Flat ``spill_dir``.)
        on_capture_error: if torch.export cannot capture the model: ``"raise"`` (default) a
            CaptureError naming the failing op, or ``"hook_only"``: continue with groups found
            by hooks (norm -> consumers folds, each checked numerically; others multiply).
            (Flat ``on_capture_error``.)
        progress: show progress bars. Default True. (Flat ``progress``.)
        verbose: print the report after convert. Default True. (Flat ``verbose``.)
    """

    sequential: Sequential = "auto"
    device: str | None = None
    split_blocks: bool = False
    spill_dir: str | None = None
    on_capture_error: OnCaptureError = "raise"
    progress: bool = True
    verbose: bool = True


#: group keyword (the class name in snake_case) -> group class, in AWQConfig's field order
GROUPS: dict[str, type] = {
    "weight_format": WeightFormat,
    "search_options": SearchOptions,
    "clip_options": ClipOptions,
    "rounding_options": RoundingOptions,
    "selection": Selection,
    "execution": Execution,
}


class _Flat(Generic[T]):
    """A flat option name on :class:`AWQConfig`, forwarding to one field of one group.

    Reading gives the group's field; writing replaces the (frozen) group by a copy with that
    field changed. On the class itself it gives the field's default.
    """

    def __init__(self, group: str, name: str) -> None:
        self.group = group
        self.name = name
        self.__doc__ = f"Flat alias of ``{group}.{name}`` (see :class:`{GROUPS[group].__name__}`)."

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: object, owner: type | None = None) -> T:
        if obj is None:
            return getattr(GROUPS[self.group], self.name)  # the default, as a dataclass field was
        return getattr(getattr(obj, self.group), self.name)

    def __set__(self, obj: object, value: T) -> None:
        group = getattr(obj, self.group)
        setattr(obj, self.group, dataclasses.replace(group, **{self.name: value}))
