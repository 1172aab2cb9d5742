"""The ``README.md`` model card written next to every saved checkpoint.

It says what the folder holds and how it was made, from what is known at save time: the
quantization settings and layout (from ``quantization_config``), what the convert report
recorded (scale groups, clipping, rounding, time) when the model was quantized in this
process, and what the caller adds (calibration data, measured perplexity) through
``save_quantized(..., model_card={...})``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["model_card"]

_LOAD = {
    "awq_ao": (
        "```python\n"
        "import awq_ao  # registers the awq_ao quantization method with transformers\n"
        "from transformers import AutoModelForCausalLM\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")   # or awq_ao.load_quantized(\"{path}\")\n"
        "```\n"
    ),
    "autoawq": (
        "AutoAWQ GEMM format: vLLM (`vllm serve {path}`), or `awq_ao.load_quantized(\"{path}\")`.\n"
    ),
    "compressed-tensors": (
        "compressed-tensors `pack-quantized` format: vLLM (`vllm serve {path}`), or "
        "`awq_ao.load_quantized(\"{path}\")`.\n"
    ),
}


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def model_card(
    model: nn.Module,
    name: str,
    fmt: str,
    qc: Mapping[str, Any],
    bits_per_weight: float | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The markdown text of the model card.

    Args:
        model: the quantized model being saved.
        name: the folder name (used in the title and the loading snippet).
        fmt: the checkpoint format.
        qc: the ``quantization_config`` written to ``config.json``.
        bits_per_weight: storage of the quantized weights (codes, scales, zeros) per weight.
        extra: rows to add (e.g. ``{"calibration": "wiki.valid.tokens, 64 x 512 tokens",
            "perplexity (WikiText-2)": 22.81}``).
    """
    from awq_ao import __version__
    from awq_ao.state import get_state

    cfg = getattr(model, "config", None)
    arch = type(model).__name__
    base = getattr(cfg, "_name_or_path", "") or ""
    from awq_ao.checkpoint.formats import (
        find_quantized_experts,
        find_quantized_layers,
        zero_is_symmetric,
    )

    weights = [q.weight for q in find_quantized_layers(model).values()]
    weights += [q.weight for q in find_quantized_experts(model).values()]
    bits_set = sorted({w.bits for w in weights}) or [qc.get("bits")]
    gs_set = sorted({w.group_size for w in weights}) or [qc.get("group_size")]
    bits = "/".join(str(b) for b in bits_set)
    gs = "/".join("per channel" if g in (-1, 0) else str(g) for g in gs_set)
    zp = not all(zero_is_symmetric(w) for w in weights) if weights else qc.get("zero_point")  # experts included
    rows: list[tuple[str, Any]] = [
        ("architecture", arch),
        ("weights", f"INT{bits}, group size {gs}" + ("" if zp is None else (", asymmetric (zero points)" if zp else ", symmetric"))),
        ("format", fmt + (f" (version {qc['format_version']})" if "format_version" in qc else "")),
    ]
    if bits_per_weight:
        rows.append(("bits per quantized weight", f"{bits_per_weight:.3f} (codes, scales and zeros)"))
    if base:
        rows.append(("base model", base))
    state = get_state(model)
    report = getattr(state, "report", None) if state is not None else None
    if report is not None:
        rows.append(("quantized linears", f"{len(report.quantized)} ({len(report.kept)} kept in full precision)"))
        if report.experts_quantized:
            rows.append(("INT4 MoE expert weights", len(report.experts_quantized)))
        rows.append(("scale groups", f"{report.folded} folded into a producer, {report.fallback_multiplies} as an input multiply"))
        rows.append(("clipped / error-feedback rounded linears", f"{report.clipped} / {report.error_feedback}"))
        if report.mode:
            rows.append(("mode", report.mode))
        if "total" in report.times:
            rows.append(("quantization time", f"{report.times['total']:.0f} s"))
    for k, v in (extra or {}).items():
        rows.append((str(k), v))
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- awq", "- awq_ao", "- quantized"] + ([f"- int{bits}"] if len(bits_set) == 1 else [])
    if base and "/" in base and not base.startswith(("/", ".")):
        front.append(f"base_model: {base}")
    front.append("---")
    table = ["| | |", "|---|---|"] + [f"| {k} | {_fmt_value(v)} |" for k, v in rows]
    body = [
        f"# {name}",
        "",
        (
            f"{arch} with {bits}-bit weights, quantized with activation-aware weight quantization (AWQ) by "
            f"awq_ao {__version__}: per-channel scales found on calibration data are folded "
            "into the preceding operations, then the linear weights are rounded to the group-wise integer grid."
        )
        if report is not None
        else (
            f"{arch} with {bits}-bit group-wise integer weights, saved by awq_ao {__version__} (how the weights "
            "were quantized was not recorded in the saving process)."
        ),
        "",
        *table,
        "",
        "## Loading",
        "",
        _LOAD.get(fmt, _LOAD["awq_ao"]).format(path=name),
    ]
    return "\n".join(front + [""] + body)
