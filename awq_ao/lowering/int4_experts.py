"""INT4 forward for transformers' 3-D MoE expert weights.

transformers 5 stores the experts of an MoE block as 3-D parameters of one module decorated
with ``transformers.integrations.moe.use_experts_implementation``: ``gate_up_proj`` (or
``up_proj`` when ``has_gate`` is False) ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (the last
two dims swapped when ``is_transposed``), with optional ``*_bias`` ``[E, out]``. The module's
forward is dispatched through ``config._experts_implementation``.

* Such a weight is a 3-D :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`: ``E`` slabs
  with exactly a linear weight's layout, stacked along a leading expert dim (always stored
  ``[out, in]``; ``transposed`` records that the parameter has the last two dims swapped).
* Its :meth:`~awq_ao.lowering.int4_tensor.Int4WeightTensor.grouped_linear` runs
  ``awq_ao::w4a16_grouped_linear`` (:mod:`awq_ao.lowering.grouped_ops`), which works under
  ``torch.compile`` (``fullgraph=True``) like transformers' own grouped-mm fallback.
* :func:`int4_experts_forward` is an experts implementation registered in transformers'
  ``ExpertsInterface`` as ``"awq_ao_int4"``; it follows the protocol attributes
  (``has_gate``, ``has_bias``, ``_apply_gate``, ``act_fn``, ``has_post_expert_norm``) and the
  routing weights exactly like the eager/grouped implementations.
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ao.lowering import grouped_ops as _grouped_ops  # noqa: F401  (registers awq_ao::w4a16_grouped_linear)
from awq_ao.lowering.int4_tensor import Int4WeightTensor

__all__ = ["int4_experts_forward", "IMPLEMENTATION", "register_implementation"]

#: Name of the experts implementation registered in transformers' ``ExpertsInterface``.
IMPLEMENTATION = "awq_ao_int4"

#: The former 3-D experts weight class, now :class:`Int4WeightTensor` itself (kept so that
#: tensors pickled before 2026-12-02 unpickle).
Int4ExpertsTensor = Int4WeightTensor


# ------------------------------------------------------------------------------------------
# the experts implementation
# ------------------------------------------------------------------------------------------


def _grouped(w: Any, x: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    if not isinstance(w, Int4WeightTensor) or w.dim() != 3:
        raise TypeError(f"the {IMPLEMENTATION!r} experts implementation needs 3-D Int4WeightTensor weights.")
    y = w.grouped_linear(x, ids)
    if bias is not None:
        valid = ((ids >= 0) & (ids < num_experts)).unsqueeze(-1)
        y = y + torch.where(valid, bias[ids.clamp(0, num_experts - 1)], 0).to(y.dtype)
    return y


def int4_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor | None = None,
    top_k_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Experts forward on 3-D :class:`Int4WeightTensor` weights (transformers' experts protocol).

    Same computation as transformers' eager/grouped implementations: every (token, slot)
    pair runs its expert's up (or gate-up) projection, the gate/activation, the down
    projection, the optional post-expert norm, and is weighted by its routing weight; the
    ``top_k`` slots of a token are summed.
    """
    if top_k_index is None:
        top_k_index = kwargs.get("router_indices", kwargs.get("selected_experts"))
    if top_k_weights is None:
        top_k_weights = kwargs.get("routing_weights", kwargs.get("router_scores"))
    if top_k_index is None or top_k_weights is None:
        raise TypeError("experts forward needs (hidden_states, top_k_index, top_k_weights).")
    num_tokens, hidden = hidden_states.shape[0], hidden_states.shape[-1]
    top_k = top_k_index.shape[-1]
    num_experts = int(self.down_proj.shape[0])
    ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    x = hidden_states.reshape(num_tokens, hidden).repeat_interleave(top_k, dim=0)
    if self.has_gate:
        w_up, b_up = self.gate_up_proj, getattr(self, "gate_up_proj_bias", None) if self.has_bias else None
    else:
        w_up, b_up = self.up_proj, getattr(self, "up_proj_bias", None) if self.has_bias else None
    h = _grouped(w_up, x, ids, b_up, num_experts)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    b_down = getattr(self, "down_proj_bias", None) if self.has_bias else None
    y = _grouped(self.down_proj, h, ids, b_down, num_experts)
    if getattr(self, "has_post_expert_norm", False):  # absent before transformers 5.2x
        y = self.post_expert_norm(y)
    valid = ((ids >= 0) & (ids < num_experts)).unsqueeze(-1)
    y = torch.where(valid, y * weights.unsqueeze(-1), 0)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def register_implementation() -> bool:
    """Register :func:`int4_experts_forward` as ``"awq_ao_int4"`` in transformers'
    ``ExpertsInterface`` (False if this transformers has no experts interface)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # pragma: no cover - transformers < 5
        return False
    ExpertsInterface.register(IMPLEMENTATION, int4_experts_forward)
    return True


register_implementation()
