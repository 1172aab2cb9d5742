"""What the scale search needs from MoE experts modules: each expert's inputs on the tokens
routed to it (and their Grams), and their 3-D weights fake-quantized as a candidate scale's
consumers. The search itself is the dense groups' (:class:`~awq_ao.passes.search.ScaleSearch`);
nothing here modifies the model except through the swap that restores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.passes.clipping import group_gram
from awq_ao.passes.experts import ExpertsInfo, expert_rows
from awq_ao.passes.group_types import ExpertSlabs
from awq_ao.passes.rounding import full_gram
from awq_ao.passes.sample_chunks import gram_tokens
from awq_ao.passes.search_loss import fake_quantize_scaled

__all__ = ["experts_call", "expert_inputs", "expert_slabs", "SlabSwap", "ExpertsTaps"]


def experts_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(hidden [T, H], routed expert ids [T, k])`` of one call of an experts module."""
    names_h = ("hidden_states",)
    names_i = ("top_k_index", "router_indices", "selected_experts")
    vals = list(args)
    h = vals[0] if vals else next((kwargs[k] for k in names_h if k in kwargs), None)
    idx = vals[1] if len(vals) > 1 else next((kwargs[k] for k in names_i if k in kwargs), None)
    if not isinstance(h, torch.Tensor) or not isinstance(idx, torch.Tensor):
        return None
    h = h.detach().reshape(-1, h.shape[-1])
    return h, idx.detach().reshape(h.shape[0], -1)


def expert_inputs(
    mod: nn.Module, info: ExpertsInfo, hidden: torch.Tensor, idx: torch.Tensor, e: int, stand_in: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x_e, h_e, tokens)``: expert ``e``'s up input (the hidden states routed to it) and its
    down input ``act(x_e W_up[e]^T + b)``, in float32. An expert without routed tokens gets
    every token of the call (its search and clipping then use the whole block's statistics),
    or, with ``stand_in=False``, empty inputs."""
    tok = (idx == e).any(dim=-1).nonzero().squeeze(1)
    if not tok.numel() and not stand_in:
        empty = hidden.new_zeros((0, hidden.shape[-1]), dtype=torch.float32)
        return empty, empty.new_zeros((0, info.inter)), 0
    xe = hidden[tok].float() if tok.numel() else hidden.float()
    w_up = getattr(mod, info.up_attr)
    z = xe @ expert_rows(w_up[e : e + 1].detach(), info.transposed)[0].float().t()
    b_up = getattr(mod, f"{info.up_attr}_bias", None) if info.has_bias else None
    if b_up is not None:
        z = z + b_up[e].float()
    h = mod._apply_gate(z) if info.has_gate else mod.act_fn(z)
    return xe, h, int(tok.numel())


def expert_slabs(w: torch.Tensor, slab: ExpertSlabs) -> list[torch.Tensor]:
    """The consumer rows ``[N, K]`` of each expert of ``slab`` (one, or all), as views of the
    logical 3-D weight ``w`` in its own dtype."""
    rows = expert_rows(w.detach(), slab.transposed)
    return [rows[slab.index]] if slab.index is not None else list(rows.unbind(0))


class SlabSwap:
    """Fake-quantized experts weights swapped in for a candidate scale (restored exactly)."""

    def __init__(self, modules: dict[str, nn.Module], slabs: list[ExpertSlabs], config: AWQConfig) -> None:
        self.params = [getattr(modules[s.module], s.attr) for s in slabs]
        self.slabs = slabs
        self.saved = [p.data for p in self.params]
        self.config = config

    def set(self, s: torch.Tensor | None) -> None:
        """Every expert's slab as ``Q(w * s) / s`` (input channels scaled by ``s``)."""
        cfg = self.config
        for p, w, slab in zip(self.params, self.saved, self.slabs, strict=True):
            rows = expert_rows(w, slab.transposed)
            e, n, k = rows.shape
            q = fake_quantize_scaled(rows.reshape(e * n, k), s, cfg.bits, cfg.group_size, cfg.zero_point)
            q = q.reshape(e, n, k)
            p.data = (q.transpose(1, 2) if slab.transposed else q).contiguous()

    def restore(self) -> None:
        for p, w in zip(self.params, self.saved, strict=True):
            p.data = w


class ExpertsTaps:
    """Records each experts module's first call during the search replay and, when it returns,
    every expert's input Grams (for clipping and error-feedback rounding, under the slab keys
    of :meth:`ExpertSlabs.key`) and its up -> down inputs (for the per-expert search)."""

    def __init__(self, modules: dict[str, nn.Module], experts: dict[str, ExpertsInfo], config: AWQConfig) -> None:
        self.modules = modules
        self.experts = experts
        self.config = config
        self.calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens: dict[str, list[int]] = {}  # experts module -> tokens routed to each expert

    def record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name not in self.calls:
            c = experts_call(args, kwargs)
            if c is not None:
                self.calls[name] = c

    def hidden_mean(self, name: str) -> torch.Tensor | None:
        """Mean |x| per channel of the experts module's input on the search sample."""
        c = self.calls.get(name)
        return None if c is None else c[0].abs().float().mean(0)

    def per_expert(self, name: str, grams: dict[str, torch.Tensor], tokens: dict[str, int], on_expert: Any) -> None:
        """For each expert e: store its input Grams in ``grams`` (rounding="gptq": full
        ``[K, K]``; else, with clipping, per group) and call ``on_expert(e, h_e)``."""
        cfg = self.config
        info, mod, call = self.experts[name], self.modules[name], self.calls.get(name)
        if call is None:
            return
        hidden, idx = call
        keep = cfg.rounding == "gptq" or cfg.clip
        counts = []
        with torch.no_grad():
            for e in range(info.num_experts):
                xe, h, n = expert_inputs(mod, info, hidden, idx, e)
                counts.append(n)
                if keep:
                    for slab, x in ((ExpertSlabs(name, info.up_attr, info.transposed), xe),
                                    (ExpertSlabs(name, "down_proj", info.transposed), h)):
                        key = slab.key(e)
                        g = full_gram(x, cfg.clip_tokens) if cfg.rounding == "gptq" else group_gram(x, cfg.group_size, cfg.clip_tokens)
                        # tokens 0 marks the whole block's stand-in: routed tokens of other rows replace it
                        grams[key], tokens[key] = g.cpu(), gram_tokens(x, cfg.clip_tokens) if n else 0
                on_expert(e, h)
        self.tokens[name] = counts
