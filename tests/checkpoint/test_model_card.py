"""The README.md model card save_quantized writes next to every checkpoint."""

from __future__ import annotations

from checkpoint_helpers import mixed_rtn_llama, quantized

from awq_ao.checkpoint import save_quantized


def test_card_says_what_was_saved(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "tiny-int4", model_card={"calibration": "2 x 16 tokens"})
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| weights | INT4, group size 32, asymmetric (zero points) |" in card
    assert "| format | awq_ao (version 3) |" in card
    assert "| bits per quantized weight | 4.750 (codes, scales and zeros) |" in card  # 4 + 24/32
    assert "| quantized linears | 14 (1 kept in full precision) |" in card
    assert "| calibration | 2 x 16 tokens |" in card
    assert 'AutoModelForCausalLM.from_pretrained("tiny-int4")' in card


def test_card_per_format_and_opt_out(tmp_path):
    ct = save_quantized(quantized("llama"), tmp_path / "ct", format="compressed-tensors")
    card = (ct / "README.md").read_text()
    assert "| weights | INT4, group size 32, asymmetric (zero points) |" in card and "vllm serve ct" in card
    mixed = (save_quantized(mixed_rtn_llama(), tmp_path / "m") / "README.md").read_text()
    assert "INT2/3/4/8" in mixed and "was not recorded" in mixed  # no convert report: no AWQ claim
    assert not (save_quantized(quantized("llama"), tmp_path / "none", model_card=False) / "README.md").exists()
