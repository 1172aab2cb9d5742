"""Perplexity with the AWQ paper's protocol, and calibration token blocks from a text.

Generic: every function takes the text or the path it works on (the project's own model and
data are located by ``devtools/shared_data.py``, outside the package).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def wikitext_test_text(path: Path) -> str:
    """The standard WikiText-2 evaluation text of a raw file such as ``wiki.test.raw``
    (``"\\n\\n".join`` of the dataset rows, as the AWQ and GPTQ evaluations build it)."""
    raw = Path(path).read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def calibration_blocks(
    tokenizer: object, text: str, n_samples: int = 64, seq_len: int = 512
) -> torch.Tensor:
    """``n_samples`` consecutive, non-overlapping token blocks ``[n, seq_len]`` from ``text``.

    Deterministic. Raises ``ValueError`` if the text is too short.
    """
    need_chars = n_samples * seq_len * 8
    ids = tokenizer(text[: need_chars * 2], return_tensors="pt", verbose=False).input_ids[0]  # type: ignore[operator]
    if ids.numel() < n_samples * seq_len:
        raise ValueError(
            f"calibration text gives {ids.numel()} tokens; need {n_samples} x {seq_len}. "
            "Use a longer text or fewer/shorter samples."
        )
    return ids[: n_samples * seq_len].view(n_samples, seq_len).clone()


def batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split ``[n, L]`` token blocks into batches."""
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping ``seq_len`` windows of ``ids`` (1-D token ids).

    Returns ``(perplexity, number of windows)``.
    """
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens: fewer than one {seq_len}-token window")
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="perplexity", leave=False)
    for i in it:
        x = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(dev)
        logits = model(x, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += float(nll)
        count += seq_len - 1
    return math.exp(total / count), n
