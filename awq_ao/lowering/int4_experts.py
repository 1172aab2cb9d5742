"""INT4 storage and forward for transformers' 3-D MoE expert weights.

transformers 5 stores the experts of an MoE block as 3-D parameters of one module decorated
with ``transformers.integrations.moe.use_experts_implementation``: ``gate_up_proj`` (or
``up_proj`` when ``has_gate`` is False) ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (the last
two dims swapped when ``is_transposed``), with optional ``*_bias`` ``[E, out]``. The module's
forward is dispatched through ``config._experts_implementation``.

* :class:`Int4ExpertsTensor` holds such a weight as ``E`` slabs with exactly the layout of
  :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor` (each slab is quantized by
  ``Int4WeightTensor.from_float`` and the inner tensors are stacked along a leading expert dim).
  The slabs are always stored ``[out, in]``; ``transposed`` records that the logical
  (parameter) shape has the last two dims swapped.
* ``awq_ao::w4a16_grouped_linear`` runs ``y[r] = x[r] @ dequant(W[expert_ids[r]]).T`` by
  calling ``awq_ao::w4a16_linear`` once per expert that receives rows. It is an opaque custom
  op with fake and autograd (input gradient) formulas, so it works under ``torch.compile``
  (``fullgraph=True``) like transformers' own grouped-mm fallback.
* :func:`int4_experts_forward` is an experts implementation registered in transformers'
  ``ExpertsInterface`` as ``"awq_ao_int4"``; it follows the protocol attributes
  (``has_gate``, ``has_bias``, ``_apply_gate``, ``act_fn``, ``has_post_expert_norm``) and the
  routing weights exactly like the eager/grouped implementations.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torchao.utils import TorchAOBaseTensor

from awq_ao.lowering import ops as _ops  # noqa: F401  (registers awq_ao:: custom ops)
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.packing import choose_layout

__all__ = ["Int4ExpertsTensor", "int4_experts_forward", "IMPLEMENTATION", "register_implementation"]

#: Name of the experts implementation registered in transformers' ``ExpertsInterface``.
IMPLEMENTATION = "awq_ao_int4"

aten = torch.ops.aten


class Int4ExpertsTensor(TorchAOBaseTensor):
    """Group-wise quantized 3-D expert weight: ``E`` stacked :class:`Int4WeightTensor` slabs.

    Logical shape: the parameter's own shape ``[E, N, K]`` (or ``[E, K, N]`` when
    ``transposed``); dtype: the original float dtype.

    Inner tensors: ``packed`` ``[E, *slab packed shape]`` uint8 and the slabs' one copy of
    metadata, stacked: ``qscale`` / ``qzero`` ``[E, N, G]``, or ``scales_and_zeros``
    ``[E, G_tg, N, 2]`` for the cpu_tinygemm layout. Attributes as for
    :class:`Int4WeightTensor`, plus ``transposed`` (the parameter stores ``[E, in, out]``).
    """

    tensor_data_names = ["packed"]
    tensor_attribute_names = [
        "bits", "group_size", "pack_layout", "layout_variant", "transposed", "shape", "dtype",
    ]
    optional_tensor_data_names = ["qscale", "qzero", "scales_and_zeros"]

    def __new__(
        cls,
        packed: torch.Tensor,
        bits: int,
        group_size: int,
        pack_layout: str,
        layout_variant: str,
        transposed: bool,
        shape: torch.Size,
        dtype: torch.dtype,
        qscale: torch.Tensor | None = None,
        qzero: torch.Tensor | None = None,
        scales_and_zeros: torch.Tensor | None = None,
    ):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        bits: int,
        group_size: int,
        pack_layout: str,
        layout_variant: str,
        transposed: bool,
        shape: torch.Size,
        dtype: torch.dtype,
        qscale: torch.Tensor | None = None,
        qzero: torch.Tensor | None = None,
        scales_and_zeros: torch.Tensor | None = None,
    ):
        super().__init__()
        self.packed = packed
        self.qscale = qscale
        self.qzero = qzero
        self.bits = bits
        self.group_size = group_size
        self.pack_layout = pack_layout
        self.layout_variant = layout_variant
        self.transposed = transposed
        self.scales_and_zeros = scales_and_zeros

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_slabs(cls, slabs: list[Int4WeightTensor], transposed: bool = False) -> Int4ExpertsTensor:
        """Stack quantized ``[N, K]`` slabs (same shape, bits, group size, layout and dtype)."""
        if not slabs:
            raise ValueError("need at least one expert slab.")
        first = slabs[0]
        for s in slabs[1:]:
            if (s.shape, s.bits, s.group_size, s.pack_layout, s.layout_variant, s.dtype) != (
                first.shape, first.bits, first.group_size, first.pack_layout, first.layout_variant,
                first.dtype,
            ):
                raise ValueError("expert slabs differ in shape, bits, group size, layout or dtype.")
        n, k = first.shape
        shape = torch.Size([len(slabs), k, n] if transposed else [len(slabs), n, k])

        def stack(name: str) -> torch.Tensor | None:
            if getattr(first, name) is None:
                return None
            return torch.stack([getattr(s, name) for s in slabs])

        return cls(
            torch.stack([s.packed for s in slabs]),
            first.bits,
            first.group_size,
            first.pack_layout,
            first.layout_variant,
            transposed,
            shape,
            first.dtype,
            stack("qscale"),
            stack("qzero"),
            stack("scales_and_zeros"),
        )

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        transposed: bool = False,
        layout: str | None = None,
    ) -> Int4ExpertsTensor:
        """Round-to-nearest quantize a float 3-D expert weight, one slab per expert.

        ``w`` is ``[E, N, K]`` (``[E, K, N]`` with ``transposed=True``); groups run along K
        (the input features), exactly as for a 2-D :class:`Int4WeightTensor`.
        """
        if w.dim() != 3:
            raise ValueError(f"expected a 3-D expert weight, got shape {tuple(w.shape)}.")
        w = w.detach()
        slabs = [(w[e].t() if transposed else w[e]).contiguous() for e in range(w.shape[0])]
        n, k = slabs[0].shape
        if layout is None:
            layout = choose_layout(w.device, bits, n, k, group_size)
        q = [Int4WeightTensor.from_float(s, bits, group_size, zero_point, layout=layout) for s in slabs]
        return cls.from_slabs(q, transposed)

    # --- accessors ------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[1])

    @property
    def scale(self) -> torch.Tensor:
        """Per-group scales ``[E, N, G]`` (see :attr:`Int4WeightTensor.scale`)."""
        if self.qscale is not None:
            return self.qscale
        return torch.stack([self.slab(e).scale for e in range(self.num_experts)])

    @property
    def zero(self) -> torch.Tensor:
        """Per-group integer zero points ``uint8 [E, N, G]``."""
        if self.qzero is not None:
            return self.qzero
        return torch.stack([self.slab(e).zero for e in range(self.num_experts)])

    @property
    def in_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[2]

    def slab(self, e: int) -> Int4WeightTensor:
        """Expert ``e`` as an ``[out, in]`` :class:`Int4WeightTensor` (views of the storage)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[e]

        return Int4WeightTensor(
            self.packed[e], self.bits, self.group_size, self.pack_layout, self.layout_variant,
            torch.Size([self.out_features, self.in_features]), self.dtype,
            pick(self.qscale), pick(self.qzero), pick(self.scales_and_zeros),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight as a plain tensor of the logical shape."""
        w = torch.stack([self.slab(e).dequantize(dtype or self.dtype) for e in range(self.num_experts)])
        return w.transpose(1, 2).contiguous() if self.transposed else w

    def nbytes_packed(self) -> int:
        """Bytes held by the inner tensors."""
        total = 0
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            total += t.numel() * t.element_size()
        return total

    def _stable_hash_for_caching(self) -> str:
        parts = [type(self).__qualname__, str(self.requires_grad)]
        parts += [repr(getattr(self, a)) for a in self.tensor_attribute_names]
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            parts.append(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.device}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
            f"group_size={self.group_size}, layout={self.pack_layout}, transposed={self.transposed})"
        )

    def _convert(self, device: torch.device | None, dtype: torch.dtype | None) -> Int4ExpertsTensor:
        slabs = [self.slab(e)._convert(device, dtype) for e in range(self.num_experts)]
        return Int4ExpertsTensor.from_slabs(slabs, self.transposed)

    def grouped_linear(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``y[r] = x[r] @ W[expert_ids[r]]`` as a linear (``[out, in]`` slabs); rows with an
        id outside ``[0, E)`` get zeros."""
        return torch.ops.awq_ao.w4a16_grouped_linear(
            x, expert_ids, self.packed, self.qscale, self.qzero, self.bits, self.group_size,
            self.in_features, self.pack_layout, self.layout_variant, self.scales_and_zeros,
        )


implements = Int4ExpertsTensor.implements


def _to_kwargs(self: Int4ExpertsTensor, args: Any, kwargs: Any) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for key in ("layout", "pin_memory", "memory_format", "copy"):
        kwargs.pop(key, None)
    args = tuple(a for a in args if not isinstance(a, torch.layout))
    return self._get_to_kwargs(*args, **kwargs)


@implements([aten._to_copy.default, aten.to.dtype_layout])
def _(func, types, args, kwargs):
    self = args[0]
    kw = _to_kwargs(self, args[1:], kwargs)
    if kw["device"] == self.device and kw["dtype"] == self.dtype:
        return self
    return self._convert(kw["device"], kw["dtype"])


@implements(aten.select.int)
def _(func, types, args, kwargs):
    """``W[e]`` of a non-transposed weight is expert ``e``'s ``[out, in]`` slab, so eager
    implementations (``F.linear(x, self.gate_up_proj[e])``) run on INT4 data too."""
    self, dim, index = args[0], args[1], args[2]
    if dim != 0 or self.transposed:
        raise NotImplementedError("Int4ExpertsTensor supports W[e] only for [E, out, in] weights.")
    return self.slab(int(index))


torch.serialization.add_safe_globals([Int4ExpertsTensor])


# ------------------------------------------------------------------------------------------
# awq_ao::w4a16_grouped_linear
# ------------------------------------------------------------------------------------------


def _rows_by_expert(expert_ids: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor]]:
    ids = expert_ids.reshape(-1)
    valid = (ids >= 0) & (ids < num_experts)
    out = []
    for e in torch.unique(ids[valid]).tolist():
        out.append((int(e), (ids == e).nonzero().squeeze(1)))
    return out


@torch.library.custom_op("awq_ao::w4a16_grouped_linear", mutates_args=())
def w4a16_grouped_linear(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[r] = x[r] @ dequant(W_e).T`` with ``e = expert_ids[r]`` for stacked packed slabs.

    Args:
        x: ``[S, in_features]`` rows. expert_ids: ``[S]`` integer expert per row; rows with
            an id outside ``[0, E)`` (expert-parallel sentinels) get zeros.
        packed, scale, zero, scales_and_zeros: the stacked inner tensors of an
            :class:`Int4ExpertsTensor` (leading dim E).
        bits, group_size, in_features, layout, variant: as for ``awq_ao::w4a16_linear``.
    """
    num_experts, n = packed.shape[0], packed.shape[1]
    out = x.new_zeros(x.shape[0], n)
    for e, rows in _rows_by_expert(expert_ids, num_experts):
        out[rows] = torch.ops.awq_ao.w4a16_linear(
            x[rows], packed[e], _pick(scale, e), _pick(zero, e), None, bits, group_size,
            in_features, layout, variant, _pick(scales_and_zeros, e),
        )
    return out


def _pick(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


@w4a16_grouped_linear.register_fake
def _grouped_fake(x, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant="", scales_and_zeros=None):
    return x.new_empty(x.shape[0], packed.shape[1])


@torch.library.custom_op("awq_ao::w4a16_grouped_linear_grad_input", mutates_args=())
def w4a16_grouped_linear_grad_input(
    grad: torch.Tensor,
    expert_ids: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input gradient of ``awq_ao::w4a16_grouped_linear``: ``grad[r] @ dequant(W_e)``."""
    out = grad.new_zeros(grad.shape[0], in_features)
    for e, rows in _rows_by_expert(expert_ids, packed.shape[0]):
        w = torch.ops.awq_ao.dequantize(
            packed[e], _pick(scale, e), _pick(zero, e), bits, group_size, in_features, layout,
            variant, grad.dtype, _pick(scales_and_zeros, e),
        )
        out[rows] = grad[rows] @ w
    return out


@w4a16_grouped_linear_grad_input.register_fake
def _grouped_grad_fake(grad, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant="", scales_and_zeros=None):
    return grad.new_empty(grad.shape[0], in_features)


def _setup_context(ctx, inputs, output):
    x, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant, sz = inputs
    ctx.save_for_backward(expert_ids, packed, scale, zero, sz)
    ctx.meta = (bits, group_size, in_features, layout, variant)


def _backward(ctx, grad):
    expert_ids, packed, scale, zero, sz = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.awq_ao.w4a16_grouped_linear_grad_input(
            grad, expert_ids, packed, scale, zero, *ctx.meta, sz
        )
    return grad_x, None, None, None, None, None, None, None, None, None, None


w4a16_grouped_linear.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# the experts implementation
# ------------------------------------------------------------------------------------------


def _grouped(w: Any, x: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    if not isinstance(w, Int4ExpertsTensor):
        raise TypeError(f"the {IMPLEMENTATION!r} experts implementation needs Int4ExpertsTensor weights.")
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
    """Experts forward on :class:`Int4ExpertsTensor` weights (transformers' experts protocol).

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
    if self.has_post_expert_norm:
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
