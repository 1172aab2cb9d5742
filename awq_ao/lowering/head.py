"""The output head in 8 bits: find it, check it, swap its weight (and a tied embedding's).

:func:`find_head` names the model's output head (``get_output_embeddings()``, else a linear
whose weight is shared with an ``nn.Embedding``) and every module sharing its weight;
:func:`quantize_head` replaces that weight by an
:class:`~awq_ao.lowering.int8_tensor.Int8RowWeightTensor`, one object registered under every
name that held the old one, so a tied embedding keeps reading the same (now 8-bit) tensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from awq_ao.lowering.int8_tensor import Int8RowWeightTensor

__all__ = ["HeadPlan", "find_head", "quantize_head"]


@dataclass
class HeadPlan:
    """The head's module name and the names of every module sharing its weight (the head first)."""

    head: str
    sharing: list[str]


def _head_module(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            mod = get_out()
        except (NotImplementedError, AttributeError):
            mod = None
        if isinstance(mod, nn.Module):
            return mod
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = [m for m in model.modules() if type(m) is nn.Linear and id(m.weight) in embedded]
    return tied[0] if len(tied) == 1 else None


def find_head(model: nn.Module) -> HeadPlan:
    """The output head of ``model`` and the modules sharing its weight.

    Raises:
        ValueError: no head (no ``get_output_embeddings()`` and no linear tied to an
            embedding), a head that is not a plain ``nn.Linear`` with a float weight, or a
            weight shared with a module that is neither a linear nor an embedding.
    """
    head = _head_module(model)
    if head is None:
        raise ValueError(
            "head='int8': this model has no output head awq_ao can find (no get_output_embeddings() "
            "and no nn.Linear sharing its weight with an nn.Embedding); use head='keep'."
        )
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    hname = names.get(id(head))
    if hname is None:
        raise ValueError("head='int8': get_output_embeddings() returned a module that is not part of the model.")
    if type(head) is not nn.Linear:
        raise ValueError(
            f"head='int8': the output head {hname!r} is a {type(head).__name__}, not an nn.Linear; use head='keep'."
        )
    w = head.weight
    if type(w) is not nn.Parameter and type(w) is not torch.Tensor or not w.is_floating_point():
        raise ValueError(
            f"head='int8': the output head {hname!r} holds a {type(w).__name__} of {w.dtype} "
            "(already quantized?); it needs a plain float weight."
        )
    sharing = [hname]
    for n, m in model.named_modules(remove_duplicate=False):
        if m is head or getattr(m, "weight", None) is not w:
            continue
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            raise ValueError(
                f"head='int8': the head's weight is also the weight of {n!r}, a {type(m).__name__}; "
                "only linears and embeddings can share an 8-bit weight. Use head='keep'."
            )
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(
                f"head='int8': the embedding {n!r} tied to the head renormalizes its weight (max_norm); "
                "use head='keep'."
            )
        sharing.append(n)
    return HeadPlan(hname, sharing)


def quantize_head(model: nn.Module, plan: HeadPlan | None = None) -> dict:
    """Store the output head's weight as 8-bit row-wise codes, in place.

    Every module in ``plan.sharing`` (default: :func:`find_head`) gets the same new parameter.
    Returns ``{"head", "sharing", "bytes_before", "bytes_after", "bits_per_weight"}``.
    """
    plan = plan or find_head(model)
    head = model.get_submodule(plan.head)
    w = head.weight
    q = nn.Parameter(Int8RowWeightTensor.from_float(w), requires_grad=False)
    before = w.numel() * w.element_size()
    for name in plan.sharing:
        model.get_submodule(name).weight = q
    if "awq_ao.integrations.transformers_quantizer" in sys.modules:  # a loaded awq_ao checkpoint
        sys.modules["awq_ao.integrations.transformers_quantizer"].remember_model(model)
    return {
        "head": plan.head,
        "sharing": plan.sharing[1:],
        "bytes_before": before,
        "bytes_after": q.nbytes_packed(),
        "bits_per_weight": q.bits_per_weight,
    }
