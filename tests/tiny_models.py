"""Tiny models of several decoder architectures, built from configs (no downloads)."""

from __future__ import annotations

import warnings

import torch
import transformers
from torch import nn

VOCAB = 96

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "gpt2", "opt", "neox", "phi3"]

# the scale groups of each ARCHS model (passes/test_fold.py, integration/test_end_to_end.py):
# expected (foldable kinds, fallback count) per decoder layer
EXPECTED = {
    "llama": ({"norm": 2, "linear": 2}, 0),
    "qwen2": ({"norm": 2, "linear": 2}, 0),
    "mistral": ({"norm": 2, "linear": 2}, 0),
    "gemma": ({"norm": 2, "linear": 2}, 0),
    "gemma2": ({"norm": 2, "linear": 2}, 0),
    "gemma3": ({"norm": 2, "linear": 2}, 0),
    "phi3": ({"norm": 2, "linear": 2}, 0),
    "opt": ({"norm": 2, "linear": 2}, 0),  # fc1 -> ReLU -> fc2 folds
    "gpt2": ({"norm": 2, "linear": 1}, 1),  # GELU before c_proj cannot fold
    "neox": ({"norm": 2, "linear": 1}, 1),  # GELU before dense_4h_to_h cannot fold
}


def _cfg(arch: str, hidden: int, heads: int, kv_heads: int, inter: int, layers: int):
    t = transformers
    head_dim = hidden // heads
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if arch == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
    if arch == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
    if arch == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if arch == "gemma":
        return t.GemmaForCausalLM, t.GemmaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if arch == "gemma2":
        return t.Gemma2ForCausalLM, t.Gemma2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if arch == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if arch == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if arch == "opt":
        return t.OPTForCausalLM, t.OPTConfig(hidden_size=hidden, ffn_dim=inter, num_attention_heads=heads, word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=0, eos_token_id=0, **common)
    if arch == "neox":
        return t.GPTNeoXForCausalLM, t.GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, bos_token_id=0, eos_token_id=0, **common)
    if arch == "phi3":
        return t.Phi3ForCausalLM, t.Phi3Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    raise KeyError(arch)


def tiny_model(
    arch: str,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised tiny ``*ForCausalLM`` of ``arch`` in eval mode.

    Norm weights are randomised too (they are ones at init, which would hide fold bugs).
    """
    cls, cfg = _cfg(arch, hidden, heads, kv_heads, inter, layers)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if "gemma" in arch and "norm" in name else 1.0) * (1.0 if "weight" in name else 0.0))
    return model.to(dtype).eval()


def token_batches(n: int = 4, batch: int = 2, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random token batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def compare_two_converts(arch: str, layers: int, kw_a: dict, kw_b: dict):
    """Quantize two copies of one tiny model with different options on the same data.

    Returns ``(report_a, report_b, mse_a, mse_b)``: the mse of each quantized model's logits
    against the float model's on held-out tokens.
    """
    import copy

    import awq_ao

    model = tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=layers)
    data = token_batches(4, 2, 24)
    test = token_batches(1, 2, 24, seed=7)[0]
    with torch.no_grad():
        ref = model(test).logits
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = awq_ao.quantize(a, data, group_size=32, verbose=False, progress=False, **kw_a)
    rb = awq_ao.quantize(b, data, group_size=32, verbose=False, progress=False, **kw_b)
    with torch.no_grad():
        ea = float((a(test).logits - ref).pow(2).mean())
        eb = float((b(test).logits - ref).pow(2).mean())
    return ra, rb, ea, eb


def assert_eager_compile_export_agree(model: nn.Module, x: torch.Tensor) -> None:
    """The logits of ``model(x)`` agree in eager mode, under ``torch.compile(fullgraph=True)``
    and through ``torch.export`` (non-strict), without a KV cache."""
    with torch.no_grad():
        eager = model(x, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True)(x, use_cache=False).logits
        ep = torch.export.export(model, (x,), {"use_cache": False}, strict=False)
        exported = ep.module()(x, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)


def snapshot(model):
    """A model's state dict (cloned) and module types, for :func:`assert_unchanged`."""
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    """The model holds exactly the tensors and module types of ``snap`` (a failed convert rolled back)."""
    sd, types = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert type(now[k]) is torch.Tensor and torch.equal(now[k], v), k
    assert [type(m) for m in model.modules()] == types


def block_call(rows: int, seq: int = 16):
    """A one-layer tiny Llama's decoder block and the (args, kwargs) of its call on ``rows`` rows."""
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    block = model.model.layers[0]
    captured = {}

    def hook(mod, args, kwargs):
        captured["call"] = (args, kwargs)

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.cat(token_batches(rows // 2, 2, seq)), use_cache=False)
    h.remove()
    return block, *captured["call"]
