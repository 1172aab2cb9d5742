"""The explicit-multiply fallback for groups whose scales cannot be folded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaledInputLinear(nn.Module):
    """``linear(x * input_scale)``: used where no producer can absorb 1/s.

    Holds the (quantized) ``weight`` and ``bias`` of the linear it replaces, so parameter
    names stay the same (``<name>.weight``), plus a buffer ``input_scale`` = 1/s.
    """

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_scale", input_scale.detach().to(linear.weight.dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the input per channel, then apply the linear."""
        return F.linear(x * self.input_scale.to(x.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale=True"
