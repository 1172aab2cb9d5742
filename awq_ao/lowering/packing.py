"""Packing of integer weight codes into storage layouts.

Codes follow :mod:`awq_ao.lowering.quant_math`: ``uint8 [N, K]`` in ``[0, 2**bits - 1]``.
A packed weight carries a *layout* tag (a string):

``"nibble"`` (bits <= 4)
    ``uint8 [N, ceil(K / 2)]`` row-major; byte ``j`` of row ``n`` holds code ``2j`` in its low
    nibble and code ``2j + 1`` in its high nibble. An odd K is padded with a zero nibble.
    This is the canonical layout; the CUDA / Triton kernels read it.

``"byte"`` (any bits, chosen for bits 5..8)
    ``uint8 [N, K]``, one code per byte.

``"cpu_tinygemm"`` (bits <= 4, CPU, ``N % 16 == 0``)
    The layout produced by ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)`` and
    read by ``torch.ops.aten._weight_int4pack_mm_for_cpu``: ``uint8 [N, K / 2]`` (K even; the
    caller pads K to a multiple of the tinygemm group size, see :func:`tinygemm_geometry`).
    It is a pure permutation of the nibble layout that depends on the CPU build of ATen
    (``BLOCK_N = 4 * Vectorized<float>::size()``): full blocks of ``BLOCK_N`` rows are stored
    ``[K, BLOCK_N / 2]`` with byte ``(k, j)`` = ``row j | row (j + BLOCK_N/2) << 4`` on AVX512 /
    AVX2 builds ("interleaved"), or ``row 2j | row (2j+1) << 4`` otherwise ("pairs"); a tail
    block of ``N % BLOCK_N`` rows always uses pairs. The *variant* string (e.g. ``"b64i"`` =
    64-row blocks, interleaved; ``"b32p"`` = 32-row blocks, pairs) names the permutation; it is
    detected once per process by probing the aten op (:func:`cpu_tinygemm_variant`) and must be
    stored next to the packed data, because a tensor packed on an AVX512 machine is not valid
    for the kernel on an AVX2 machine.

Pack and unpack never call the aten op; tests check them against it.
"""

from __future__ import annotations

import functools
import math

import torch

from awq_ao.lowering.quant_math import effective_group_size, num_groups

__all__ = [
    "LAYOUT_NIBBLE",
    "LAYOUT_BYTE",
    "LAYOUT_CPU_TINYGEMM",
    "LAYOUTS",
    "TINYGEMM_GROUP_SIZES",
    "pack",
    "unpack",
    "choose_layout",
    "cpu_tinygemm_variant",
    "tinygemm_supported",
    "tinygemm_geometry",
    "tinygemm_scales_and_zeros",
    "tinygemm_qparams",
    "parse_variant",
    "packed_shape",
]

LAYOUT_NIBBLE = "nibble"
LAYOUT_BYTE = "byte"
LAYOUT_CPU_TINYGEMM = "cpu_tinygemm"
LAYOUTS = (LAYOUT_NIBBLE, LAYOUT_BYTE, LAYOUT_CPU_TINYGEMM)

#: Group sizes accepted by ``aten._weight_int4pack_mm_for_cpu``.
TINYGEMM_GROUP_SIZES = (256, 128, 64, 32)
#: ``aten._convert_weight_to_int4pack_for_cpu`` requires N divisible by this.
TINYGEMM_N_MULTIPLE = 16

# Candidate permutations (block rows, interleaved) probed against the aten op, most likely first.
_TINYGEMM_CANDIDATES = (
    (64, True),
    (32, True),
    (32, False),
    (16, False),
    (64, False),
    (128, True),
    (128, False),
    (16, True),
)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_layout(layout: str, bits: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}.")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in 1..8 for uint8 codes.")
    if layout in (LAYOUT_NIBBLE, LAYOUT_CPU_TINYGEMM) and bits > 4:
        raise ValueError(f"layout {layout!r} holds at most 4-bit codes, got bits={bits}.")


@functools.lru_cache(maxsize=64)
def parse_variant(variant: str) -> tuple[int, bool]:
    """``"b64i"`` -> ``(64, True)``; ``"b32p"`` -> ``(32, False)``."""
    if (
        len(variant) < 3
        or variant[0] != "b"
        or variant[-1] not in "ip"
        or not variant[1:-1].isdigit()
    ):
        raise ValueError(f"bad cpu_tinygemm variant {variant!r}; expected e.g. 'b64i' or 'b32p'.")
    block = int(variant[1:-1])
    if block % TINYGEMM_N_MULTIPLE:
        raise ValueError(f"bad cpu_tinygemm variant {variant!r}: block must be a multiple of 16.")
    return block, variant[-1] == "i"


def _format_variant(block: int, interleaved: bool) -> str:
    return f"b{block}{'i' if interleaved else 'p'}"


# --------------------------------------------------------------------------------------------
# tinygemm permutation
# --------------------------------------------------------------------------------------------


def _pack_tinygemm(codes: torch.Tensor, variant: str) -> torch.Tensor:
    n, k = codes.shape
    block, interleaved = parse_variant(variant)
    n_full = (n // block) * block
    parts = []
    if n_full:
        v = codes[:n_full].view(n_full // block, block, k)
        if interleaved:
            lo, hi = v[:, : block // 2], v[:, block // 2 :]
        else:
            lo, hi = v[:, 0::2], v[:, 1::2]
        b = lo | (hi << 4)  # [nb, block/2, K]
        parts.append(b.transpose(1, 2).reshape(n_full, k // 2))
    tail = n - n_full
    if tail:
        t = codes[n_full:]
        b = t[0::2] | (t[1::2] << 4)  # [tail/2, K]
        parts.append(b.t().reshape(tail, k // 2))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


def _unpack_tinygemm(packed: torch.Tensor, variant: str) -> torch.Tensor:
    n, kh = packed.shape
    k = 2 * kh
    block, interleaved = parse_variant(variant)
    n_full = (n // block) * block
    parts = []
    if n_full:
        b = packed[:n_full].reshape(n_full // block, k, block // 2).transpose(1, 2)
        lo, hi = b & 15, b >> 4  # [nb, block/2, K]
        if interleaved:
            v = torch.cat([lo, hi], dim=1)
        else:
            v = torch.stack([lo, hi], dim=2).reshape(n_full // block, block, k)
        parts.append(v.reshape(n_full, k))
    tail = n - n_full
    if tail:
        b = packed[n_full:].reshape(k, tail // 2).t()  # [tail/2, K]
        parts.append(torch.stack([b & 15, b >> 4], dim=1).reshape(tail, k))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


@functools.cache
def cpu_tinygemm_variant() -> str | None:
    """The ``cpu_tinygemm`` permutation of this process's ATen CPU kernels, or ``None``.

    Probes ``aten._convert_weight_to_int4pack_for_cpu`` once on a small index-coded weight and
    returns the matching variant string (``"b64i"`` on AVX512 builds, ``"b32i"`` on AVX2, ...).
    ``None`` means the op is missing or packs in a way we do not model: the layout is then
    never chosen.
    """
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return None
    n, k = 2 * 128 + 48, 6  # full blocks and a tail for every candidate block size
    gen = torch.Generator().manual_seed(1234)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    try:
        ref = op(codes, 1)
    except Exception:  # pragma: no cover - op present but unusable on this build
        return None
    c8 = codes.to(torch.uint8)
    for block, interleaved in _TINYGEMM_CANDIDATES:
        variant = _format_variant(block, interleaved)
        if ref.shape == (n, k // 2) and torch.equal(_pack_tinygemm(c8, variant), ref):
            return variant
    return None  # pragma: no cover


@functools.lru_cache(maxsize=4096)
def tinygemm_geometry(in_features: int, group_size: int) -> tuple[int, int] | None:
    """``(tinygemm_group_size, padded_in_features)`` for a weight, or ``None`` if unsupported.

    tinygemm needs a group size in :data:`TINYGEMM_GROUP_SIZES` dividing the (padded) K. Our
    groups are expressed with a tinygemm group ``tg`` that divides ``group_size`` (each tinygemm
    group then lies inside one of ours and repeats its scale/zero); a weight with a single group
    (``group_size == -1`` or ``group_size >= K``) can use any ``tg`` and picks the one with the
    least padding. K is padded to a multiple of ``tg``.
    """
    if in_features <= 0:
        return None
    if num_groups(in_features, group_size) == 1:
        tg = min(TINYGEMM_GROUP_SIZES, key=lambda g: ((-in_features) % g, -g))
    else:
        gs = effective_group_size(in_features, group_size)
        cands = [g for g in TINYGEMM_GROUP_SIZES if gs % g == 0]
        if not cands:
            return None
        tg = cands[0]
    return tg, math.ceil(in_features / tg) * tg


def tinygemm_supported(bits: int, out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a weight can use the ``cpu_tinygemm`` layout in this process."""
    return (
        bits <= 4
        and out_features > 0
        and out_features % TINYGEMM_N_MULTIPLE == 0
        and tinygemm_geometry(in_features, group_size) is not None
        and cpu_tinygemm_variant() is not None
    )


def tinygemm_scales_and_zeros(
    scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int
) -> torch.Tensor:
    """The ``[G_tg, N, 2]`` scale/offset tensor read by ``_weight_int4pack_mm_for_cpu``.

    tinygemm dequantizes ``(q - 8) * s + o``; with ``s = scale`` and ``o = (8 - zero) * scale``
    that is our ``(q - zero) * scale``. Groups are repeated when the tinygemm group is smaller
    than ours (see :func:`tinygemm_geometry`). Computed in float32, returned in ``scale.dtype``.
    """
    geom = tinygemm_geometry(in_features, group_size)
    if geom is None:
        raise ValueError(
            f"no tinygemm geometry for in_features={in_features}, group_size={group_size}."
        )
    tg, k_pad = geom
    n, g = scale.shape
    gs = effective_group_size(in_features, group_size)
    idx = torch.arange(k_pad // tg, device=scale.device) * tg // gs
    idx = idx.clamp_(max=g - 1)
    s = scale.float().index_select(1, idx)
    o = (8.0 - zero.float().index_select(1, idx)) * s
    return torch.stack([s, o], dim=-1).transpose(0, 1).contiguous().to(scale.dtype)


def tinygemm_qparams(
    scales_and_zeros: torch.Tensor, in_features: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`tinygemm_scales_and_zeros`: ``(scale float32 [N, G], zero uint8 [N, G])``.

    The offset was rounded once from ``(8 - zero) * scale`` with ``|8 - zero| <= 8``; in
    bfloat16 (unit roundoff ``2**-8``) or wider its relative error is at most ``2**-8``, so
    ``8 - offset / scale`` lies within ``8 * 2**-8 = 1/32`` of the integer zero point and rounds
    back to it exactly. A group whose scale is 0 (an all-zero group) dequantizes to 0 for every zero
    point; it gets the midpoint ``2**(4-1) = 8``.
    """
    geom = tinygemm_geometry(in_features, group_size)
    if geom is None:
        raise ValueError(
            f"no tinygemm geometry for in_features={in_features}, group_size={group_size}."
        )
    tg, _ = geom
    g = num_groups(in_features, group_size)
    gs = effective_group_size(in_features, group_size)
    # the first tinygemm group of each of our groups
    idx = torch.arange(g, device=scales_and_zeros.device) * gs // tg
    sz = scales_and_zeros.index_select(0, idx).float()  # [G, N, 2]
    s, o = sz[..., 0].t().contiguous(), sz[..., 1].t()
    zero = torch.where(s != 0, 8.0 - o / torch.where(s != 0, s, 1.0), 8.0)
    zero = zero.round_().clamp_(0, 15).to(torch.uint8)
    return s, zero


# --------------------------------------------------------------------------------------------
# public pack / unpack
# --------------------------------------------------------------------------------------------


def packed_shape(n: int, k: int, layout: str) -> tuple[int, int]:
    """Shape of the packed tensor for ``n x k`` codes (``k`` already padded for tinygemm)."""
    if layout == LAYOUT_BYTE:
        return n, k
    if layout in (LAYOUT_NIBBLE, LAYOUT_CPU_TINYGEMM):
        return n, (k + 1) // 2
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}.")


def pack(codes: torch.Tensor, bits: int, layout: str, variant: str | None = None) -> torch.Tensor:
    """Pack ``uint8 [N, K]`` codes into ``layout``.

    Args:
        codes: integer codes in ``[0, 2**bits - 1]``, ``uint8 [N, K]``.
        bits: code width (nibble / cpu_tinygemm need ``bits <= 4``).
        layout: ``"nibble"``, ``"byte"`` or ``"cpu_tinygemm"``.
        variant: cpu_tinygemm permutation (default: this process's, see
            :func:`cpu_tinygemm_variant`). Ignored for the other layouts.

    For ``"cpu_tinygemm"`` the caller pads K beforehand (see :func:`tinygemm_geometry`), K must
    be even and N a multiple of 16.
    """
    _check_layout(layout, bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}.")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}.")
    if codes.numel() and codes.device.type != "meta" and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed the {bits}-bit range (max {int(codes.max())}).")
    n, k = codes.shape
    if layout == LAYOUT_BYTE:
        return codes.contiguous().clone()
    if layout == LAYOUT_NIBBLE:
        if k % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    # cpu_tinygemm
    variant = variant or cpu_tinygemm_variant()
    if variant is None:
        raise RuntimeError("cpu_tinygemm layout is not available with this PyTorch build.")
    if n % TINYGEMM_N_MULTIPLE or k % 2:
        raise ValueError(
            f"cpu_tinygemm needs N % {TINYGEMM_N_MULTIPLE} == 0 and even (padded) K, got [{n}, {k}]."
        )
    return _pack_tinygemm(codes.contiguous(), variant)


def _unpack_nibble(packed: torch.Tensor) -> torch.Tensor:
    n, kh = packed.shape
    if torch.compiler.is_compiling():
        return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, 2 * kh)
    # two strided writes into one buffer: ~2x faster than stack in eager mode
    out = torch.empty(n, kh, 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=out[..., 0])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1])
    return out.view(n, 2 * kh)


def unpack(
    packed: torch.Tensor, bits: int, layout: str, n: int, k: int, variant: str | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [n, k]`` codes (padding columns dropped).

    For ``"cpu_tinygemm"``, ``variant`` must be the one used to pack (default: this process's).
    """
    _check_layout(layout, bits)
    if packed.dim() != 2 or packed.shape[0] != n:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match n={n}.")
    if layout == LAYOUT_BYTE:
        if packed.shape[1] < k:
            raise ValueError(f"packed shape {tuple(packed.shape)} too small for k={k}.")
        return packed[:, :k].clone()
    if 2 * packed.shape[1] < k:
        raise ValueError(f"packed shape {tuple(packed.shape)} too small for k={k}.")
    if layout == LAYOUT_NIBBLE:
        codes = _unpack_nibble(packed)
    else:
        variant = variant or cpu_tinygemm_variant()
        if variant is None:
            raise RuntimeError("cpu_tinygemm variant unknown; pass the one used to pack.")
        codes = _unpack_tinygemm(packed, variant)
    return codes if codes.shape[1] == k else codes[:, :k]


def choose_layout(device: torch.device | str, bits: int, n: int, k: int, group_size: int) -> str:
    """Pick the storage layout for an ``[n, k]`` weight that will live on ``device``.

    ``"byte"`` for bits > 4; ``"cpu_tinygemm"`` on CPU when tinygemm supports the shape and
    group size (N % 16 == 0, a tinygemm group size in {32, 64, 128, 256} dividing group_size, or
    a single group per row); ``"nibble"`` otherwise (CUDA and everything else).
    """
    device = torch.device(device)
    if bits > 4:
        return LAYOUT_BYTE
    if device.type == "cpu" and tinygemm_supported(bits, n, k, group_size):
        return LAYOUT_CPU_TINYGEMM
    return LAYOUT_NIBBLE
