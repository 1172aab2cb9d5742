"""Tiny configurations for any transformers architecture, derived from its config defaults.

:func:`tiny_config` takes a model class, instantiates its config class with the defaults,
walks every attribute (and every sub-config) and shrinks the size-like ones consistently:
hidden size 64, 4 attention heads of 16 (grouped-query ratio kept), 2-4 layers (one of each
layer type where the config lists them), vocabulary <= 512, intermediate sizes 128 (64 for
experts), at most 4 experts with top-2 routing. Attribute names are matched by pattern
(``n_embd``/``d_model``/``hidden_size``, ``*_heads``, ``*head_dim*``, ``*intermediate*``,
``*experts*``, per-layer lists of the original layer count, ...), never by model name.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
INTER = 128
MOE_INTER = 64
VOCAB = 512
EXPERTS = 4
TOP_K = 2
MAX_LAYERS = 6

_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "emb_dim", "embed_dim", "hidden_dim")
_LAYER_KEYS = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers",
)
_HEAD_KEYS = (
    "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
    "decoder_attention_heads",
)
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "num_query_groups", "n_kv_heads")
_INTER_KEYS = (
    "intermediate_size", "ffn_dim", "n_inner", "d_inner", "ffn_hidden_size", "dim_ff", "dff",
    "feed_forward_size", "decoder_ffn_dim", "inner_hidden_size",
)
# Attributes that are never sizes of weights, whatever their names look like.
_NOT_SIZE = re.compile(
    r"position|window|max_|_max|^n_ctx$|seed|bucket|chunk_size_feed|logits_to_keep|patch|image|"
    r"cache|batch|codebook|type_vocab|token|_idx$|_index$|num_labels|beam|length|alpha|beta|"
    r"factor|scale|multiple|round|conv_kernel|kernel_size|d_conv|_conv|ngram|hash|stride|"
    r"topk_blocks|local_blocks|block_size|iters|cycles|layer_start|layer_end|nextn|chunk"
)
_SIZE_LIKE = re.compile(
    r"(size|dim|width|channels|rank|inner|hidden|_ff|ffn|features|d_ssm)$|_dim_|hidden_size"
)


class TinyConfigError(RuntimeError):
    """A tiny configuration could not be derived for an architecture."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first_int(d: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, int | None]:
    for k in keys:
        v = d.get(k)
        if _is_int(v) and v > 0:
            return k, int(v)
    return None, None


def _round_to(v: float, m: int, lo: int) -> int:
    return max(lo, int(round(v / m)) * m)


@dataclass
class _Dims:
    """Original and new sizes of one (sub-)config."""

    h0: int | None
    l0: int | None
    nh0: int | None
    nkv0: int | None
    hd0: int | None
    i0: int | None
    keep: list[int]
    kinds: list[str] | None = None  # the kept layers' kinds, when the config lists them
    # hidden sizes of every config in the tree (sub-configs refer to each other's sizes)
    all_h0: frozenset[int] = frozenset()
    nh: int = HEADS
    nkv: int = HEADS
    hd: int = HEAD_DIM

    @property
    def layers(self) -> int:
        return len(self.keep)


def _is_type_list(k: str, v: Any, l0: int) -> bool:
    """A per-layer list/string of layer kinds (``layer_types``, ``hybrid_override_pattern``)."""
    return (
        isinstance(v, (list, tuple, str))
        and len(v) == l0
        and l0 > 2
        and re.search(r"type|pattern|block", k) is not None
        and all(isinstance(x, str) for x in v)
    )


def _layer_selection(d: dict[str, Any], l0: int | None) -> tuple[list[int], list[str] | None]:
    """Layers to keep (the first two of each distinct layer kind, at least two) and their kinds.

    A shorter cyclic pattern of kinds (``block_types = (recurrent, recurrent, attention)``)
    keeps one full period so that every kind is built.
    """
    if not l0:
        return [0, 1], None
    for k, v in d.items():
        if _is_type_list(k, v, l0):
            seen: dict[str, list[int]] = {}
            for i, x in enumerate(v):
                if len(seen.setdefault(x, [])) < 2:
                    seen[x].append(i)
            if len(seen) == 1:
                return list(range(min(2, l0))), [v[0]] * min(2, l0)
            keep = sorted(i for idx in seen.values() for i in idx)[:MAX_LAYERS]
            return keep, [v[i] for i in keep]
    for k, v in d.items():
        if (
            isinstance(v, (list, tuple))
            and 2 < len(v) < l0
            and re.search(r"type|pattern", k)
            and all(isinstance(x, str) for x in v)
            and len(set(v)) > 1
        ):
            n = min(len(v), MAX_LAYERS)
            return list(range(n)), list(v[:n])
    return list(range(min(2, l0))), None


def _dims(d: dict[str, Any], parent: _Dims | None = None) -> _Dims:
    if parent is not None and _first_int(d, _HIDDEN_KEYS)[1] is None:
        # a dict of overrides for some layers: sizes it does not set are the parent's
        return parent
    _, h0 = _first_int(d, _HIDDEN_KEYS)
    _, l0 = _first_int(d, _LAYER_KEYS)
    _, nh0 = _first_int(d, _HEAD_KEYS)
    _, nkv0 = _first_int(d, _KV_KEYS)
    hd0 = d.get("head_dim") if _is_int(d.get("head_dim")) else None
    if hd0 is None and h0 and nh0:
        hd0 = h0 // nh0
    _, i0 = _first_int(d, _INTER_KEYS)
    if i0 is None and isinstance(d.get("intermediate_size"), (list, tuple)) and d["intermediate_size"]:
        i0 = int(d["intermediate_size"][0])
    keep, kinds = _layer_selection(d, l0)
    dims = _Dims(h0, l0, nh0, nkv0 or nh0, hd0, i0, keep, kinds)
    if nh0 and dims.nkv0 and dims.nkv0 != nh0:
        dims.nkv = 1 if dims.nkv0 == 1 else 2
    return dims


def _map_layer_index_list(v: list[Any], dims: _Dims) -> list[Any]:
    return [dims.keep.index(i) for i in v if i in dims.keep]


def _shrink_int(k: str, v: int, dims: _Dims) -> int:
    """New value of integer attribute ``k`` (name patterns first, then value equality)."""
    kl = k.lower()
    if kl in _LAYER_KEYS or (dims.l0 and v == dims.l0 and "layer" in kl and "per" not in kl):
        return dims.layers
    if kl == "is_decoder":
        return v
    if "vocab" in kl and "type" not in kl:
        return min(v, VOCAB)
    if kl in ("n_group", "num_expert_group", "topk_group", "n_groups_expert"):
        return min(v, 1)
    if "expert" in kl or kl in ("moe_k", "moe_topk", "top_k"):
        if re.search(r"per_tok|top_?k|moe_k$", kl):
            return min(v, TOP_K)
        if "group" in kl:
            return min(v, 1)
        if "shared" in kl and "size" not in kl and "dim" not in kl:
            return min(v, 1)
        if re.search(r"(num|n)_.*experts?$|experts?_num$|^num_experts", kl):
            return min(v, EXPERTS)
    if re.search(r"first_k_dense|num_dense_layers|dense_replace", kl):
        return min(v, 1)
    if re.search(r"(period|interval|every_n|_step)$|every_n_layers", kl) and dims.l0:
        # layer patterns given by period/offset: keep the pattern visible in few layers
        return v if dims.kinds is not None else (min(v, 2) if v > 0 else v)
    if kl.endswith("_offset") and dims.l0:
        return v if dims.kinds is not None else v % 2
    if "layer" in kl and dims.l0 and 0 < v < dims.l0 and kl.startswith(("num_", "n_")):
        new = round(v * dims.layers / dims.l0)
        if "shared" in kl:
            # layers reusing earlier layers' state: earlier layers of every kind must remain
            kinds = dims.kinds or ["layer"] * dims.layers
            while new > 0 and set(kinds[: dims.layers - new]) != set(kinds):
                new -= 1
            return max(0, min(dims.layers - 1, new))
        return max(1, min(dims.layers - 1, new))
    if _NOT_SIZE.search(kl):
        return v
    if kl in _HEAD_KEYS or kl in _KV_KEYS or re.search(r"heads$|_heads_num$|(^|_)n_head$", kl):
        if dims.nh0 and v == dims.nh0:
            return dims.nh
        if dims.nkv0 and v == dims.nkv0:
            return dims.nkv
        if dims.nh0:
            return max(1, round(v * dims.nh / dims.nh0))
        return min(v, HEADS)
    if re.search(r"head_dim|head_size|^d_head$|^dim_head$|kv_channels|headdim|d_head$", kl):
        if dims.hd0 and v == dims.hd0:
            return dims.hd
        if dims.hd0:
            return max(2, 2 * round(v * dims.hd / dims.hd0 / 2))
        return min(v, HEAD_DIM)
    if re.search(r"intermediate|ffn|inner|dim_ff|^dff$|feed_forward|mlp_hidden", kl):
        if re.search(r"moe|expert|shared", kl):
            return min(v, MOE_INTER)
        if dims.i0 and v == dims.i0:
            return INTER
        if dims.i0:
            return _round_to(v * INTER / dims.i0, 16, 16)
        return min(v, INTER)
    if kl in _HIDDEN_KEYS or (v in dims.all_h0 and _SIZE_LIKE.search(kl)):
        return HIDDEN
    if re.search(r"state_size|d_state|ssm_state", kl):
        return min(v, 16)
    if "groups" in kl and dims.h0:
        return min(v, 1)
    if _SIZE_LIKE.search(kl) and dims.h0 and v > 16:
        return _round_to(v * HIDDEN / dims.h0, 8, 8)
    return v


def _shrink_rope(r: dict[str, Any], dims: _Dims, prf: float) -> dict[str, Any]:
    out = dict(r)
    if any(isinstance(v, dict) for v in r.values()):  # one rope dict per layer type
        return {k: _shrink_rope(v, dims, prf) if isinstance(v, dict) else v for k, v in r.items()}
    prf = float(r.get("partial_rotary_factor", prf) or 1.0)
    half0 = int((dims.hd0 or 0) * prf) // 2
    half = int(dims.hd * prf) // 2
    for k, v in r.items():
        if isinstance(v, list) and v and all(_is_int(x) for x in v) and sum(v) == half0 and half0:
            new = [max(1, int(math.floor(x * half / half0))) for x in v]
            new[new.index(max(new))] += half - sum(new)
            out[k] = new
        elif isinstance(v, list) and v and len(v) == half0 and half0:
            out[k] = v[:half]
    return out


def _all_hidden(d: dict[str, Any]) -> set[int]:
    """Hidden sizes of a config dict and of every config dict nested in it."""
    out: set[int] = set()
    h = _first_int(d, _HIDDEN_KEYS)[1]
    if h:
        out.add(h)
    for v in d.values():
        if isinstance(v, dict):
            out |= _all_hidden(v)
    return out


def _looks_like_config(d: dict[str, Any]) -> bool:
    """A dict of config attributes (has integer sizes such as ``head_dim`` or ``hidden_size``)."""
    return "model_type" in d or any(
        _is_int(v) and re.search(r"hidden|head|intermediate|layers|vocab", k) for k, v in d.items()
    )


def shrink_dict(d: dict[str, Any], parent: _Dims | None = None) -> dict[str, Any]:
    """Shrink one config dict (as from ``to_dict()``); sub-config dicts are shrunk recursively.

    ``parent``: the enclosing config's sizes, used for dicts of per-layer overrides that do
    not state a hidden size of their own.
    """
    dims = _dims(d, parent)
    if parent is None or dims is not parent:
        dims.all_h0 = parent.all_h0 if parent is not None else frozenset(_all_hidden(d))
    out: dict[str, Any] = {}
    prf = d.get("partial_rotary_factor", 1.0)
    for k, v in d.items():
        if isinstance(v, dict) and "layer" in k.lower() and dims.l0 and v and all(
            str(x).isdigit() for x in v
        ):  # {layer index: settings}
            out[k] = {
                type(i)(dims.keep.index(int(i))): shrink_dict(val, dims) if isinstance(val, dict) else val
                for i, val in v.items()
                if int(i) in dims.keep
            }
            continue
        if isinstance(v, dict) and ("model_type" in v or k.endswith("_config")):
            # a sub-config, or a dict of per-layer-kind settings ({"sliding_attention": {...}})
            out[k] = {
                kk: shrink_dict(vv, dims) if isinstance(vv, dict) and _looks_like_config(vv) else vv
                for kk, vv in v.items()
            } if not _looks_like_config(v) else shrink_dict(v, dims)
            continue
        if isinstance(v, dict) and k.startswith("rope"):
            out[k] = _shrink_rope(v, dims, prf if isinstance(prf, (int, float)) else 1.0)
            continue
        per_layer = False
        if dims.l0 and dims.l0 > 2 and isinstance(v, str) and _is_type_list(k, v, dims.l0):
            out[k] = "".join(v[i] for i in dims.keep)
            continue
        if dims.l0 and dims.l0 > 2 and isinstance(v, (list, tuple)) and len(v) == dims.l0:
            v = [v[i] for i in dims.keep]
            per_layer = True
        if isinstance(v, (list, tuple)):
            if (
                not per_layer
                and "layer" in k.lower()
                and dims.l0
                and v
                and all(_is_int(x) and x < dims.l0 for x in v)
            ):
                out[k] = _map_layer_index_list(list(v), dims)
            elif v and all(_is_int(x) for x in v) and re.search(r"intermediate|ffn|size|dim", k):
                out[k] = [_shrink_int(k, int(x), dims) for x in v]
            else:
                out[k] = list(v)
            continue
        if _is_int(v):
            out[k] = _shrink_int(k, v, dims)
            continue
        out[k] = v
    # token ids must lie inside the new vocabulary
    vocab = out.get("vocab_size")
    if _is_int(vocab):
        for k, v in list(out.items()):
            if re.search(r"token_id$|token_index$|_token_ids$|^pad_idx$", k):
                if _is_int(v) and v >= vocab:
                    out[k] = vocab - 1 - zlib.crc32(k.encode()) % 3
                elif isinstance(v, list):
                    out[k] = [x if not _is_int(x) or x < vocab else vocab - 1 for x in v]
    _fix_mamba(d, out)
    _fill_missing(out)
    return out


def _fill_missing(out: dict[str, Any]) -> None:
    """Sizes some config classes leave ``None`` by default although their models need them."""
    h, nh = _first_int(out, _HIDDEN_KEYS)[1], _first_int(out, _HEAD_KEYS)[1]
    if "head_dim" in out and out["head_dim"] is None and h and nh:
        out["head_dim"] = h // nh
    if "num_key_value_heads" in out and out["num_key_value_heads"] is None and nh:
        out["num_key_value_heads"] = nh
    has_experts = any(_is_int(v) and re.search(r"experts$", k) for k, v in out.items())
    for k in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k"):
        if k in out and out[k] is None and has_experts:
            out[k] = TOP_K


def with_attention_layer(out: dict[str, Any]) -> dict[str, Any] | None:
    """A variant of a hybrid config whose kept layers include one full-attention layer.

    Default configs of some hybrid (state-space + attention) models list no attention layer
    at all, which their own mask code does not support. Returns ``None`` when no change applies.
    """
    new = dict(out)
    changed = False
    for k, v in out.items():
        if isinstance(v, list) and len(v) >= 2 and re.search(r"layer.*type|block_type", k):
            if all(isinstance(x, str) for x in v) and len(set(v)) == 1 and re.search(
                r"linear|mamba|recurrent|ssm|conv", v[0]
            ):
                new[k] = [*v[:-1], "full_attention"]
                changed = True
        elif re.search(r"attn_layer_ind|attention_layer_ind", k) and not v:
            new[k] = [1]
            changed = True
    return new if changed else None


def with_default_depth(d: dict[str, Any], out: dict[str, Any]) -> dict[str, Any] | None:
    """A last-resort variant with the default layer structure (counts and per-layer lists),
    for configs whose validators tie several layer counts together (e.g. input + recurrent +
    output layers == num_hidden_layers). Widths stay tiny. ``None`` when nothing changes."""
    new = dict(out)
    for k, v in d.items():
        kl = k.lower()
        depth = kl in _LAYER_KEYS or ("layer" in kl and (_is_int(v) or isinstance(v, (list, str))))
        if depth and out.get(k) != v:
            new[k] = v
    return new if new != out else None


def _fix_mamba(d: dict[str, Any], out: dict[str, Any]) -> None:
    """Keep ``heads * head_dim == expand * hidden`` for state-space mixers (ratio preserved)."""
    h0, h = _first_int(d, _HIDDEN_KEYS)[1], _first_int(out, _HIDDEN_KEYS)[1]
    if not h0 or not h:
        return
    for hk in [k for k in d if re.search(r"(mamba|ssm).*heads|^n_mamba_heads$|^num_heads$", k)]:
        prefix = hk.split("_")[0]
        dk = next(
            (k for k in d if re.search(r"head_?dim|d_head", k) and (k.startswith(prefix) or hk == "num_heads")),
            None,
        )
        if dk is None or not _is_int(d.get(hk)) or not _is_int(d.get(dk)):
            continue
        if hk == "num_heads" and _first_int(d, ("num_attention_heads",))[1]:
            continue
        ratio = d[hk] * d[dk] / h0
        inner = ratio * h
        dim = min(int(d[dk]), HEAD_DIM)
        if inner >= dim and float(inner / dim).is_integer():
            out[dk] = dim
            out[hk] = int(inner / dim)
        for gk in [k for k in d if re.search(r"n_?groups$", k) and _is_int(d[k])]:
            out[gk] = 1


def _default_dict(cfg_cls: type) -> dict[str, Any]:
    """The config class defaults as a dict (from the dataclass fields if defaults don't validate)."""
    try:
        return cfg_cls().to_dict()
    except Exception:  # noqa: BLE001 - some default configs fail their own validation
        import dataclasses

        if not dataclasses.is_dataclass(cfg_cls):
            raise
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cfg_cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


def tiny_configs(model_cls: type) -> list[Any]:
    """Tiny instances of ``model_cls.config_class`` derived from its defaults, best first.

    Only attributes whose value changes are passed to the constructor (whole dicts for
    sub-configs), so derived attributes (e.g. ``layer_types`` from the layer count) are
    recomputed by the config class itself. The first candidate of a hybrid model whose
    defaults list no attention layer adds one (:func:`with_attention_layer`); callers use
    the first candidate that builds a working model; the last keeps the default depth
    (:func:`with_default_depth`) for configs whose validators tie layer counts together. Raises :class:`TinyConfigError` with
    the config class's own message when no candidate validates.
    """
    cfg_cls = model_cls.config_class
    d = _default_dict(cfg_cls)
    new = shrink_dict(d)
    variants = [v for v in (with_attention_layer(new), new, with_default_depth(d, new)) if v is not None]
    out: list[Any] = []
    error: Exception | None = None
    for variant in variants:
        overrides = {
            k: v for k, v in variant.items() if d.get(k) != v or isinstance(v, dict) and k.endswith("_config")
        }
        if d.get("is_decoder") is False:
            overrides["is_decoder"] = True  # a causal LM use of a config that has the flag
        try:
            out.append(cfg_cls(**overrides))
        except Exception as e:  # noqa: BLE001 - the next variant may validate
            error = e
    if not out:
        assert error is not None
        msg = str(error).strip().splitlines()
        raise TinyConfigError(f"{cfg_cls.__name__}: {' '.join(msg[:2])}"[:300]) from error
    return out


def tiny_config(model_cls: type) -> Any:
    """The first of :func:`tiny_configs`."""
    return tiny_configs(model_cls)[0]
