"""awq_ao.evaluation: the chunked loss is the unchunked one bit for bit; BOS per window/block."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from awq_ao import evaluation
from awq_ao.evaluation import _nll_sum, calibration_blocks, leading_bos, perplexity, text_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_is_cross_entropy_bit_for_bit(monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(301, 500, generator=g) * 4).to(dtype)
    target = torch.randint(0, 500, (301,), generator=g)
    ref = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
    for elements in (1 << 26, 500 * 7, 1):  # one chunk, 7 rows, one row at a time
        monkeypatch.setattr(evaluation, "_LOSS_CHUNK_ELEMENTS", elements)
        assert torch.equal(_nll_sum(logits, target), ref)


class _Tok:
    """Whitespace tokenizer: word -> its length; optionally prepends BOS 0 like Gemma's."""

    bos_token_id = 0

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None, verbose=True):
        ids = [1 + len(w) % 9 for w in text.split()]
        if add_special_tokens and self.adds_bos:
            ids = [0, *ids]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


TEXT = " ".join("a" * (1 + (i * 7) % 11) for i in range(400))


def test_leading_bos_and_blocks():
    assert leading_bos(_Tok(adds_bos=False)) is None
    tok = _Tok(adds_bos=True)
    assert leading_bos(tok) == 0
    plain = text_ids(tok, TEXT, 0)
    assert plain[0] != 0 and torch.equal(text_ids(tok, TEXT, None)[1:], plain)
    blocks = calibration_blocks(tok, TEXT, 4, 16, bos_token_id=0)
    assert blocks.shape == (4, 16) and (blocks[:, 0] == 0).all()
    assert torch.equal(blocks[:, 1:].reshape(-1), plain[: 4 * 15])
    # without bos_token_id: the tokenizer's own encoding cut in pieces, as before
    assert torch.equal(calibration_blocks(tok, TEXT, 4, 16).reshape(-1), text_ids(tok, TEXT)[:64])


def test_calibration_offset_is_another_draw_of_the_same_text():
    tok = _Tok(adds_bos=False)
    first = calibration_blocks(tok, TEXT, 6, 16)
    later = calibration_blocks(tok, TEXT, 4, 16, offset=2)
    assert torch.equal(later, first[2:])  # the blocks after the first two, no overlap with them
    with_bos = calibration_blocks(_Tok(adds_bos=True), TEXT, 3, 16, bos_token_id=0, offset=1)
    assert torch.equal(with_bos, calibration_blocks(_Tok(adds_bos=True), TEXT, 4, 16, bos_token_id=0)[1:])
    with pytest.raises(ValueError, match="offset"):
        calibration_blocks(tok, TEXT, 4, 16, offset=-1)
    with pytest.raises(ValueError, match="smaller offset"):
        calibration_blocks(tok, TEXT, 4, 16, offset=10_000)


class _Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 10)

    def forward(self, x, use_cache=False):
        return SimpleNamespace(logits=self.emb(x))


def test_perplexity_windows_with_bos():
    model, ids = _Bigram(), text_ids(_Tok(adds_bos=True), TEXT, 0)
    ppl, n = perplexity(model, ids, seq_len=32, bos_token_id=0)
    assert n == ids.numel() // 31
    nll = 0.0
    for i in range(n):
        x = torch.cat([torch.tensor([0]), ids[i * 31 : (i + 1) * 31]])
        nll += float(nn.functional.cross_entropy(model.emb(x[:-1]), x[1:], reduction="sum"))
    assert ppl == pytest.approx(math.exp(nll / (n * 31)), rel=1e-6)
    # no BOS: plain seq_len windows, as before
    assert perplexity(model, ids, seq_len=32)[1] == ids.numel() // 32
