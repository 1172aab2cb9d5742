"""The data of scale-group discovery: a scale group (:class:`ScaleGroup`), its producer
(:class:`Producer`) and how 1/s folds into the producer's parameters (:class:`ParamFold`), and
the result of the whole analysis (:class:`GraphAnalysis`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ParamFold", "Producer", "ExpertSlabs", "ScaleGroup", "GraphAnalysis"]


@dataclass
class ParamFold:
    """How to divide a producer's output channels by s through one parameter.

    ``affine`` lists scalar ops (name, constant) applied to the parameter before it
    multiplies the normalised activations, e.g. Gemma's ``1 + w`` is ``[("add", 1.0)]``;
    the fold solves ``f(w') = f(w) / s``. ``dim`` is the parameter dimension holding the
    producer's output channels.
    """

    name: str
    dim: int = 0
    affine: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Producer:
    """What computes X (``kind``: "norm", "linear" or "none") and how to fold into it."""

    kind: str
    module: str | None = None
    params: list[ParamFold] = field(default_factory=list)
    out_channels: int = 0
    path: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExpertSlabs:
    """Consumers inside a transformers experts module: the input channels of its 3-D weight
    ``attr`` (stored ``[E, out, in]``, or ``[E, in, out]`` when ``transposed``), of every
    expert (``index`` None: the MoE block input's group) or of expert ``index`` only."""

    module: str
    attr: str
    transposed: bool = False
    index: int | None = None

    def key(self, e: int) -> str:
        """The name of expert ``e``'s slab (its input Gram's key, e.g. ``mlp.experts.down_proj[3]``)."""
        return f"{self.module}.{self.attr}[{e}]"


@dataclass
class ScaleGroup:
    """One AWQ scale group: consumers sharing an input X and X's producer.

    Consumers are linears (``consumers``) and/or slabs of MoE experts weights (``slabs``).
    Two group kinds hold experts: the MoE block input (producer: e.g. the norm before the
    block; consumers: every expert's gate_up, shared-expert linears; ``rescaled_params``: the
    router, kept in full precision) and one expert's up -> down pair (producer kind
    ``"experts_up"``: the up rows of expert ``slabs[0].index``; consumer: its down slab).
    """

    x_node: str
    in_features: int
    consumers: list[str]
    rescaled: list[str] = field(default_factory=list)
    producer: Producer = field(default_factory=lambda: Producer("none"))
    foldable: bool = False
    reason: str = ""
    inspect: str | None = None
    channel_map: torch.Tensor | None = None  # X channel -> producer channel
    consumer_is_conv1d: dict[str, bool] = field(default_factory=dict)
    slabs: list[ExpertSlabs] = field(default_factory=list)
    #: parameters read by X's other readers (MoE routers): ``(name, input-channel dim)``,
    #: multiplied by s, kept in full precision
    rescaled_params: list[tuple[str, int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """Short label for reports: the producer kind or "fallback"."""
        return self.producer.kind if self.foldable else "fallback"

    @property
    def searched(self) -> bool:
        """Whether the group has anything to scale (linears or experts slabs)."""
        return bool(self.consumers or self.slabs)

    def tie_groups(self) -> torch.Tensor | None:
        """Class id per X channel: channels mapped to one producer channel share a scale."""
        if self.channel_map is None:
            return None
        if torch.unique(self.channel_map).numel() == self.channel_map.numel():
            return None
        return self.channel_map


@dataclass
class GraphAnalysis:
    """Result of :func:`find_groups`."""

    groups: list[ScaleGroup]
    unseen: list[str]  # targets that never appear as a linear in the graph
    qk_linears: set[str]  # linears feeding attention queries/keys (clipping is skipped)
    shared_calls: list[str]  # targets called more than once (scaling skipped)
    # targets whose weight the model also reads directly (``x @ lin.weight.T``,
    # ``lin.weight.view(...)``): the op that does, per target. A quantized weight tensor
    # must support those ops, or such layers must stay in full precision.
    direct_weight_use: dict[str, str] = field(default_factory=dict)
    # MoE experts modules to quantize (name -> passes.experts.ExpertsInfo), planned with the
    # groups; their slabs are consumers of the groups above
    experts: dict[str, Any] = field(default_factory=dict)
    # what the planning could not do (e.g. an MoE block input that cannot be scaled)
    notes: list[str] = field(default_factory=list)
    # filled by the search: tokens routed to each expert of each experts module
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
