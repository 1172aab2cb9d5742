"""Which quantized layers vLLM's fast W4A16 kernels will not take, known before export.

vLLM serves AutoAWQ and compressed-tensors ``pack-quantized`` checkpoints with its Marlin
kernels (``awq_marlin`` / ``gptq_marlin``, and the compressed-tensors WNA16 scheme on top of
them). Marlin reads 4- or 8-bit weights in groups of 32, 64 or 128 (or one group per row) and
tiles the weight in blocks of 64 output by 128 input features, so a layer needs
``out_features % 64 == 0`` and ``in_features % 128 == 0`` (per tensor-parallel shard). vLLM
falls back to slower kernels, or refuses to load, where these do not hold. These limits are
vLLM's ``marlin_utils`` constants (``GPTQ_MARLIN_MIN_THREAD_N = 64``,
``GPTQ_MARLIN_MIN_THREAD_K = 128``, ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MARLIN_GROUP_SIZES", "MARLIN_BITS", "MARLIN_MIN_N", "MARLIN_MIN_K", "marlin_issues", "describe_issues"]

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_BITS = (4, 8)
MARLIN_MIN_N = 64
MARLIN_MIN_K = 128


def marlin_issues(
    layers: Iterable[tuple[str, int, int, int, int]], tensor_parallel: int = 1
) -> dict[str, str]:
    """``{layer: reason}`` for every layer vLLM's Marlin kernels cannot run.

    Args:
        layers: ``(name, out_features, in_features, bits, group_size)`` per quantized layer
            (``group_size`` -1 or 0, or >= ``in_features``: one group per row).
        tensor_parallel: the tensor-parallel size the model will be served with; each shard
            must satisfy the limits (column-parallel layers split ``out_features``,
            row-parallel ones ``in_features``; both are checked, which is conservative).
    """
    out: dict[str, str] = {}
    for name, n, k, bits, gs in layers:
        reasons = []
        per_row = gs in (-1, 0) or gs >= k
        if bits not in MARLIN_BITS:
            reasons.append(f"{bits}-bit (Marlin: {'/'.join(map(str, MARLIN_BITS))})")
        if not per_row and gs not in MARLIN_GROUP_SIZES:
            reasons.append(f"group size {gs} (Marlin: 32/64/128 or per channel)")
        if not per_row and k % gs:
            reasons.append(f"in_features {k} not a multiple of the group size {gs}")
        n_shard, k_shard = n // tensor_parallel, k // tensor_parallel
        if n % tensor_parallel or n_shard % MARLIN_MIN_N:
            reasons.append(f"out_features {n}{f'/{tensor_parallel}' if tensor_parallel > 1 else ''} not a multiple of {MARLIN_MIN_N}")
        if k % tensor_parallel or k_shard % MARLIN_MIN_K:
            reasons.append(f"in_features {k}{f'/{tensor_parallel}' if tensor_parallel > 1 else ''} not a multiple of {MARLIN_MIN_K}")
        if reasons:
            out[name] = "; ".join(reasons)
    return out


def describe_issues(issues: dict[str, str], fmt: str, limit: int = 4) -> str:
    """One readable warning for :func:`marlin_issues`' result."""
    shown = [f"{name} ({why})" for name, why in list(issues.items())[:limit]]
    more = f" and {len(issues) - limit} more" if len(issues) > limit else ""
    return (
        f"{len(issues)} layer(s) of this {fmt} export will not run on vLLM's Marlin kernels: "
        f"{', '.join(shown)}{more}. vLLM falls back to slower kernels or refuses them; the "
        "checkpoint itself is valid (awq_ao and transformers load it)."
    )
