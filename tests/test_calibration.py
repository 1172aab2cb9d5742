"""Calibration data sources (awq_ao.calibration) and ``awq_ao.quantize(tokenizer=, dataset=)``."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
import torch
from checkpoint_helpers import SAMPLE_TEXT, char_tokenizer, int4_layers
from tiny_models import tiny_model

import awq_ao
from awq_ao.calibration import CalibrationDataError, calibration_batches, load_texts, token_blocks
from awq_ao.passes.convert import CalibrationError


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_blocks_are_consecutive_tokens_of_the_joined_rows(tok):
    rows = [SAMPLE_TEXT[:500], SAMPLE_TEXT[500:1500]]
    blocks = token_blocks(tok, rows, n_samples=3, seq_len=100)
    want = _ids(tok, "\n\n".join(rows))[:300]
    assert blocks.shape == (3, 100) and blocks.flatten().tolist() == want
    batches = calibration_batches(tok, rows, n_samples=3, seq_len=100, batch_size=2)
    assert [b.shape[0] for b in batches] == [2, 1] and torch.equal(torch.cat(batches), blocks)


def test_files_folders_and_saved_datasets(tok, tmp_path):
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT)
    rows = [{"text": SAMPLE_TEXT[:800], "other": 1}, {"text": SAMPLE_TEXT[800:], "other": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text(SAMPLE_TEXT)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(tmp_path / "a.txt") == [SAMPLE_TEXT]
    assert load_texts(str(tmp_path / "d.jsonl")) == [r["text"] for r in rows]
    assert load_texts(tmp_path / "folder") == [SAMPLE_TEXT]
    assert load_texts(tmp_path / "saved") == [r["text"] for r in rows]
    assert load_texts(datasets.Dataset.from_list(rows)) == [r["text"] for r in rows]
    with pytest.raises(CalibrationDataError, match=r"no column 'body'.*columns: text, other"):
        load_texts(tmp_path / "d.jsonl", text_field="body")


def test_bad_sources_get_one_line_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(CalibrationDataError, match="list of strings"):
        load_texts(42)
    with pytest.raises(CalibrationDataError, match=r"gives \d+ tokens; 4 x 512 = 2048 are needed"):
        calibration_batches(tok, ["too short"], n_samples=4, seq_len=512)
    with pytest.raises(CalibrationDataError, match="n_samples must be an integer >= 1"):
        calibration_batches(tok, [SAMPLE_TEXT], n_samples=0)
    # a hub name that is not cached, offline: a clear error, no network wait
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CalibrationDataError, match=r"'nobody/no-such-dataset' .*could not be loaded.*local text file"):
        load_texts("nobody/no-such-dataset")


def test_chat_template(tok):
    with pytest.raises(CalibrationDataError, match="no chat template"):
        token_blocks(tok, [SAMPLE_TEXT], 1, 16, chat_template=True)
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    def text(ids: torch.Tensor) -> str:  # the character tokenizer's decode puts spaces between tokens
        return "".join(tok.convert_ids_to_tokens(ids.tolist()))

    blocks = token_blocks(tok, [SAMPLE_TEXT[:200]], 1, 30, chat_template=True)
    assert text(blocks[0]).startswith("<user>The quick brown fox")
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": SAMPLE_TEXT[:100]}]]
    assert text(token_blocks(tok, chats, 1, 13, chat_template=True)[0]) == "<user>hi<assi"


def test_quantize_with_tokenizer_and_dataset(tok):
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    opts = dict(group_size=32, n_grid=3, verbose=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(a, tokenizer=tok, dataset=[SAMPLE_TEXT], n_samples=4, seq_len=32, batch_size=2, **opts)
        awq_ao.quantize(b, calibration_batches(tok, [SAMPLE_TEXT], 4, 32, 2), **opts)
    wa, wb = int4_layers(a), int4_layers(b)
    assert wa and all(torch.equal(wa[n].dequantize(), wb[n].dequantize()) for n in wa)
    with pytest.raises(CalibrationError, match="not both"):
        awq_ao.quantize(tiny_model("llama"), [torch.zeros(1, 4, dtype=torch.long)], tokenizer=tok)
    with pytest.raises(CalibrationError, match="dataset need tokenizer"):
        awq_ao.quantize(tiny_model("llama"), None, dataset=[SAMPLE_TEXT])


def test_text_options_without_a_tokenizer_are_an_error():
    with pytest.raises(CalibrationError, match="n_samples, seq_len need tokenizer"):
        awq_ao.quantize(tiny_model("llama"), [torch.zeros(1, 4, dtype=torch.long)], n_samples=8, seq_len=64)


def _bos_char_tokenizer():
    """A character tokenizer that, like Gemma's and Llama's, puts <bos> in front of a text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<bos>"], vocab["[UNK]"] = 95, 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 95)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>")


def test_token_blocks_start_with_the_tokenizers_own_bos():
    tok = _bos_char_tokenizer()
    assert tok("ab").input_ids == [95, 65, 66]
    blocks = token_blocks(tok, [SAMPLE_TEXT], n_samples=3, seq_len=20)
    assert blocks.shape == (3, 20) and (blocks[:, 0] == 95).all()
    text = tok(SAMPLE_TEXT, add_special_tokens=False).input_ids
    assert blocks[:, 1:].reshape(-1).tolist() == text[: 3 * 19]  # consecutive text, no token lost
    # a tokenizer without a BOS of its own: blocks are the text cut in pieces, as before
    plain = token_blocks(char_tokenizer(), [SAMPLE_TEXT], n_samples=3, seq_len=20)
    assert plain.reshape(-1).tolist() == char_tokenizer()(SAMPLE_TEXT).input_ids[:60]
