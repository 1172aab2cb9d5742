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


def leading_bos(tokenizer: object) -> int | None:
    """The BOS id ``tokenizer`` puts in front of a sequence by itself, else ``None``.

    Gemma's and Llama's tokenizers prepend ``<bos>`` when called with their defaults;
    SmolLM2's and GPT-2's prepend nothing. Pass the result as ``bos_token_id`` to
    :func:`calibration_blocks` and :func:`perplexity` so that every calibration block and every
    evaluation window starts with it, as each would when tokenized on its own.
    """
    with_special = tokenizer("a", verbose=False).input_ids  # type: ignore[operator]
    plain = tokenizer("a", add_special_tokens=False, verbose=False).input_ids  # type: ignore[operator]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return int(bos)
    return None


def text_ids(tokenizer: object, text: str, bos_token_id: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text``: the tokenizer's defaults when ``bos_token_id`` is None (as
    before), without special tokens otherwise (:func:`perplexity` then adds the BOS per window)."""
    kw = {} if bos_token_id is None else {"add_special_tokens": False}
    return tokenizer(text, return_tensors="pt", verbose=False, **kw).input_ids[0]  # type: ignore[operator]


def calibration_blocks(
    tokenizer: object, text: str, n_samples: int = 64, seq_len: int = 512, bos_token_id: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``n_samples`` consecutive, non-overlapping token blocks ``[n, seq_len]`` from ``text``.

    With ``bos_token_id`` (see :func:`leading_bos`) each block is that BOS followed by the next
    ``seq_len - 1`` tokens of the text (tokenized without special tokens); without it, the
    blocks are the tokenizer's default encoding of the text cut in ``seq_len`` pieces.
    ``offset``: skip that many blocks first (another calibration draw from the same text; 0,
    the default, gives the blocks every committed result used). Deterministic. Raises
    ``ValueError`` if the text is too short.
    """
    if offset < 0:
        raise ValueError(f"calibration_blocks: offset must be >= 0 blocks, got {offset}")
    need_chars = (offset + n_samples) * seq_len * 8
    ids = text_ids(tokenizer, text[: need_chars * 2], bos_token_id)
    per_block = seq_len if bos_token_id is None else seq_len - 1
    if ids.numel() < (offset + n_samples) * per_block:
        raise ValueError(
            f"calibration text gives {ids.numel()} tokens; need {offset} + {n_samples} blocks of {per_block}. "
            "Use a longer text, fewer/shorter samples or a smaller offset."
        )
    blocks = ids[offset * per_block : (offset + n_samples) * per_block].view(n_samples, per_block)
    if bos_token_id is not None:
        blocks = torch.cat([blocks.new_full((n_samples, 1), bos_token_id), blocks], dim=1)
    return blocks.clone()


def batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split ``[n, L]`` token blocks into batches."""
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]


# rows of logits turned into float32 log-probabilities at a time (about 256 MiB)
_LOSS_CHUNK_ELEMENTS = 1 << 26


def _nll_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(logits.float(), target, reduction="sum")``, bit for bit, without a
    float32 log-softmax copy of all of ``logits`` (2 GiB per 2048-token window at a 262144-token
    vocabulary): per-token losses chunk by chunk (row-wise, so identical), then summed by
    ``nll_loss``'s own sum reduction, whose order depends only on the per-token sequence."""
    rows = max(1, _LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    per_token = torch.cat([
        nn.functional.cross_entropy(logits[s : s + rows].float(), target[s : s + rows], reduction="none")
        for s in range(0, logits.shape[0], rows)
    ])
    return nn.functional.nll_loss(-per_token[:, None], torch.zeros_like(target), reduction="sum")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = False,
    bos_token_id: int | None = None,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping ``seq_len`` windows of ``ids`` (1-D token ids).

    With ``bos_token_id`` each window is that BOS followed by the next ``seq_len - 1`` tokens
    of ``ids`` (which then should not hold a BOS of their own, see :func:`text_ids`); every
    window still scores ``seq_len - 1`` predicted tokens. Returns ``(perplexity, number of
    windows)``.
    """
    stride = seq_len if bos_token_id is None else seq_len - 1
    n = ids.numel() // stride
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
        x = ids[i * stride : (i + 1) * stride]
        if bos_token_id is not None:
            x = torch.cat([x.new_full((1,), bos_token_id), x])
        x = x.unsqueeze(0).to(dev)
        logits = model(x, use_cache=False).logits
        nll = _nll_sum(logits[0, :-1], x[0, 1:])
        del logits
        total += float(nll)
        count += seq_len - 1
    return math.exp(total / count), n
