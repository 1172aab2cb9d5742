"""The human-readable summary produced by convert."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GroupReport:
    """One row of the report: a scale group and what the search found."""

    kind: str
    producer: str | None
    consumers: list[str]
    inspect: str | None
    alpha: float | None
    loss_rtn: float | None
    loss_best: float | None
    note: str = ""


@dataclass
class ConvertReport:
    """What convert did, with timings (seconds)."""

    bits: int
    group_size: int
    zero_point: bool
    groups: list[GroupReport] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)
    clipped: int = 0
    error_feedback: int = 0  # linears rounded with error feedback (rounding="gptq")
    # clip_after_rounding: rows of clipped linears that kept the searched / half / no clipping
    clip_after_rounding_rows: list[int] = field(default_factory=list)
    float_targets: int = 0  # linears rounded toward the float model's output (gptq_float_target)
    # block_refine_steps: one awq_ao.passes.block_refine.RefineResult per refined block
    block_refine: list = field(default_factory=list)
    fallback_multiplies: int = 0
    times: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    experts_quantized: list[str] = field(default_factory=list)  # 3-D MoE expert weights
    experts_no_tokens: int = 0  # experts that received no calibration tokens in the search rows
    spilled_bytes: int = 0  # rollback originals kept on disk (sequential spill_dir)
    mode: str = ""  # how the model was walked: layer by layer (which stack) or whole model
    footprint: dict = field(default_factory=dict)  # lowering.swap.footprint of the result
    head: dict = field(default_factory=dict)  # lowering.head.quantize_head's result (head="int8")

    @property
    def folded(self) -> int:
        """Number of groups whose scales were folded into a producer."""
        return sum(1 for g in self.groups if g.kind != "fallback" and g.alpha is not None)

    def kind_counts(self) -> dict[str, int]:
        """Groups by producer kind ("norm", "linear", "fallback", ...)."""
        return dict(Counter(g.kind for g in self.groups))

    def summary(self, max_rows: int = 12) -> str:
        """A readable multi-line summary (worst groups by loss first)."""
        lines = [
            f"awq_ao: INT{self.bits} g{self.group_size} {'asym' if self.zero_point else 'sym'}: "
            f"{len(self.quantized)} linears quantized, {len(self.kept)} kept in full precision"
            + (f"; {self.mode}" if self.mode else ""),
            f"  groups: {len(self.groups)} ({', '.join(f'{k}: {v}' for k, v in sorted(self.kind_counts().items()))}); "
            f"folded {self.folded}, explicit multiplies {self.fallback_multiplies}, clipped {self.clipped}"
            + (f", error-feedback rounded {self.error_feedback}" if self.error_feedback else "")
            + (f" ({self.float_targets} toward the float model's output)" if self.float_targets else ""),
        ]
        if self.clip_after_rounding_rows:
            r = self.clip_after_rounding_rows
            lines.append(f"  clipping chosen after rounding: rows kept the searched clipping {r[0]}"
                         + (f", half of it {r[1]}, none {r[2]}" if len(r) == 3 else ""))
        if self.block_refine:
            r = self.block_refine
            kept = [x for x in r if x.kept]
            gain = sum(1 - x.loss_after / x.loss_before for x in kept if x.loss_before > 0) / max(len(kept), 1)
            lines.append(f"  block refinement: {len(kept)} of {len(r)} blocks kept it (output error -{100 * gain:.1f}% "
                         f"on average, {100 * sum(x.changed_codes for x in r) / max(sum(x.codes for x in r), 1):.2f}% "
                         "of codes changed)")
        if self.experts_quantized:
            lines.append(
                f"  MoE experts: {len(self.experts_quantized)} 3-D expert weights quantized; "
                f"{self.experts_no_tokens} experts received no calibration tokens in the search rows (searched on the whole block's tokens)"
            )
        if self.size_before:
            lines.append(
                f"  size: {self.size_before / 2**20:.1f} MiB -> {self.size_after / 2**20:.1f} MiB "
                f"({self.size_before / max(self.size_after, 1):.2f}x smaller)"
            )
        fp = self.footprint
        if fp.get("bits_per_weight"):
            lays = ", ".join(f"{k} {v}" for k, v in sorted(fp.get("layouts", {}).items()))
            lines.append(
                f"  footprint: {fp['bits_per_weight']:.2f} bits per quantized weight "
                f"({fp['quantized_bytes'] / 2**20:.1f} MiB for {fp['quantized_weights'] / 1e6:.1f} M weights; "
                f"layouts: {lays}); {fp['full_precision_bytes'] / 2**20:.1f} MiB kept in full precision"
            )
            if "cpu_tinygemm" in fp.get("layouts", {}):
                from awq_ao.lowering.cpu_kernels import describe

                lines.append(f"  CPU kernels: {describe()}")
            if "nibble" in fp.get("layouts", {}) or "byte" in fp.get("layouts", {}):
                lines.append(
                    "  nibble/byte layers: Triton W4A16 kernels on CUDA; on CPU (N % 16 != 0, bits > 4 "
                    "or a group size tinygemm lacks) dequantization + a matmul in the activation dtype"
                )
        if self.head:
            h = self.head
            tied = f" (shared with {', '.join(h['sharing'])})" if h["sharing"] else ""
            lines.append(
                f"  head: {h['head']}{tied} 8-bit row-wise, {h['bits_per_weight']:.2f} bits per weight: "
                f"{h['bytes_before'] / 2**20:.1f} MiB -> {h['bytes_after'] / 2**20:.1f} MiB"
            )
        if self.spilled_bytes:
            lines.append(f"  rollback originals kept on disk instead of in memory: {self.spilled_bytes / 2**20:.0f} MiB")
        if self.times:
            lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items()))
        scored = [g for g in self.groups if g.loss_rtn is not None and g.loss_best is not None]
        if scored:
            tot_r = sum(g.loss_rtn for g in scored)  # type: ignore[misc]
            tot_b = sum(g.loss_best for g in scored)  # type: ignore[misc]
            lines.append(f"  search loss (sum over groups): RTN {tot_r:.4g} -> AWQ {tot_b:.4g}")
            lines.append("  kind      alpha  loss RTN -> AWQ   consumers")
            for g in sorted(scored, key=lambda r: -(r.loss_rtn or 0))[:max_rows]:
                cons = ", ".join(c.rsplit(".", 2)[-2] + "." + c.rsplit(".", 1)[-1] if "." in c else c for c in g.consumers)
                alpha = f"{g.alpha:5.2f}" if g.alpha is not None else "  rtn"
                lines.append(f"  {g.kind:9s} {alpha}  {g.loss_rtn:.3e} -> {g.loss_best:.3e}  {cons}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
