"""Shared builders for the checkpoint / interop / CLI tests (cached: quantize once per session)."""

from __future__ import annotations

import functools
import warnings

import torch
import transformers
from tiny_models import VOCAB, tiny_model, token_batches
from torch import nn

import awq_ao
from awq_ao.lowering import Int4WeightTensor, quantize_linear_module


def tied_llama(seed: int = 0) -> nn.Module:
    """A tiny Llama whose lm_head shares the embedding (like SmolLM2)."""
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + 1.0)
    return m.eval()


@functools.cache
def quantized(arch: str, zero_point: bool = True, group_size: int = 32) -> nn.Module:
    """A tiny AWQ-quantized model (shared; tests must not modify it)."""
    model = tied_llama() if arch == "tied_llama" else tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(
            model, token_batches(2), group_size=group_size, zero_point=zero_point,
            verbose=False, progress=False,
        )
    return model


@functools.cache
def mixed_rtn_llama() -> nn.Module:
    """Tiny Llama quantized round-to-nearest with per-layer bits/group sizes: 4-bit g32
    (cpu_tinygemm layout), 3-bit ragged g48 (nibble layout) and 8-bit (byte layout)."""
    model = tiny_model("llama", seed=3)
    settings = {"q_proj": (4, 32), "k_proj": (3, 48), "v_proj": (8, 64), "o_proj": (4, -1),
                "gate_proj": (4, 32), "up_proj": (2, 32), "down_proj": (4, 48)}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in settings and isinstance(mod, nn.Linear):
            bits, gs = settings[leaf]
            quantize_linear_module(mod, bits=bits, group_size=gs)
    return model


def logits(model: nn.Module, seed: int = 7) -> torch.Tensor:
    """Logits of a fixed batch."""
    x = token_batches(1, batch=2, seq=12, seed=seed)[0]
    with torch.no_grad():
        return model(x).logits


def int4_layers(model: nn.Module) -> dict[str, Int4WeightTensor]:
    """name -> Int4WeightTensor of every quantized module."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int4WeightTensor)}


def char_tokenizer():
    """A 96-token character-level tokenizer matching the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["[UNK]"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow. "
) * 40


def assert_same_grid(w, ref: torch.Tensor, msg: str = "") -> None:
    """``w.dequantize()`` equals ``ref`` exactly, except on the cpu_tinygemm layout: there the
    weight holds bfloat16 scale/offset pairs (what its kernel reads), so each value may move
    by the bf16 rounding of the scale (<= 15 * 2**-8 steps) and of the offset (<= 1/32 step)."""
    got = w.dequantize(torch.float32)
    ref = ref.float()
    if w.pack_layout != "cpu_tinygemm":
        assert torch.equal(got, ref), msg
        return
    gs = w.group_size if 0 < w.group_size < w.shape[1] else w.shape[1]
    step = w.scale.float().repeat_interleave(gs, dim=1)[:, : w.shape[1]]
    assert torch.all((got - ref).abs() <= step * (15 * 2**-8 + 2**-5) + 1e-7), msg
