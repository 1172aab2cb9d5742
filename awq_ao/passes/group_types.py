"""The data of scale-group discovery: a scale group (:class:`ScaleGroup`), its producer
(:class:`Producer`) and how 1/s folds into the producer's parameters (:class:`ParamFold`), and
the result of the whole analysis (:class:`GraphAnalysis`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ParamFold", "Producer", "ScaleGroup", "GraphAnalysis"]


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


@dataclass
class ScaleGroup:
    """One AWQ scale group: consumers sharing an input X and X's producer."""

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

    @property
    def kind(self) -> str:
        """Short label for reports: the producer kind or "fallback"."""
        return self.producer.kind if self.foldable else "fallback"

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
