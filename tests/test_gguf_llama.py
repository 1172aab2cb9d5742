"""devtools.gguf_llama: the fast GGUF reader of the development model.

Block formats against a float64 reference written here from the format's definition (and
against the ``gguf`` package's own dequantizer), a tiny Llama written to GGUF and read back
exactly (and read the same by transformers' GGUF loader), clear errors for what it does not
read, and, with ``../shared`` present, the real SmolLM2 file bit-identical to transformers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from devtools.gguf_llama import Q4_0, Q4_1, Q8_0, dequantize, load_llama_gguf, read_gguf  # noqa: E402
from devtools.shared_data import SMOLLM2_DIR, SMOLLM2_GGUF, shared_dir  # noqa: E402

_QTYPE = {Q4_0: gguf.GGMLQuantizationType.Q4_0, Q4_1: gguf.GGMLQuantizationType.Q4_1,
          Q8_0: gguf.GGMLQuantizationType.Q8_0}


def _random_blocks(rng: np.random.Generator, ggml_type: int, n_blocks: int) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks with finite float16 ``d`` (and ``m``)."""
    halves = 2 if ggml_type == Q4_1 else 1
    h = rng.normal(0, 0.05, size=(n_blocks, halves)).astype(np.float16)
    payload = 32 if ggml_type == Q8_0 else 16
    q = rng.integers(0, 256, size=(n_blocks, payload), dtype=np.uint8)
    return np.concatenate([h.view(np.uint8), q], axis=1).reshape(-1)


def _reference(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """float64 values from the block definitions, element by element in block order."""
    bb = {Q4_0: 18, Q4_1: 20, Q8_0: 34}[ggml_type]
    out = []
    for blk in raw.reshape(-1, bb):
        d = float(blk[:2].view(np.float16)[0])
        if ggml_type == Q8_0:
            out += [d * float(v) for v in blk[2:].view(np.int8)]
            continue
        m = float(blk[2:4].view(np.float16)[0]) if ggml_type == Q4_1 else 0.0
        qs = blk[4:] if ggml_type == Q4_1 else blk[2:]
        nib = [int(b) & 15 for b in qs] + [int(b) >> 4 for b in qs]
        out += [d * q + m if ggml_type == Q4_1 else d * (q - 8) for q in nib]
    return np.array(out, dtype=np.float64)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from([Q4_0, Q4_1, Q8_0]), n_blocks=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_block_formats_match_float64_reference(kind: int, n_blocks: int, seed: int) -> None:
    raw = _random_blocks(np.random.default_rng(seed), kind, n_blocks)
    got = dequantize(torch.from_numpy(raw.copy()), kind, (n_blocks, 32))
    ref = _reference(raw, kind).reshape(n_blocks, 32)
    # d * q is exact in float32 and the one addition rounds once: float32(ref) exactly
    assert torch.equal(got, torch.from_numpy(ref.astype(np.float32)))
    lib = gguf.quants.dequantize(raw.reshape(n_blocks, -1), _QTYPE[kind]).reshape(n_blocks, 32)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(lib, dtype=np.float32)))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row interleave (what the reader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _write_gguf(model, path, q8_embedding: bool = False, rope_scaling: float | None = None) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # a string array the reader skips
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        stem = name.rsplit(".", 1)[0]
        if stem == "lm_head" and cfg.tie_word_embeddings:
            continue
        if stem.startswith("model.layers."):
            i, rest = stem[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{per_layer[rest]}.weight"
        else:
            gname = names[stem] + ".weight"
        a = t.numpy().astype(np.float32)
        if gname.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if q8_embedding and gname == "token_embd.weight":
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    _finish(w)


def _assert_same_model(a, b, ids: torch.Tensor) -> None:
    """Every tensor and the logits on ``ids`` bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def _finish(w) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_round_trips_exactly(tmp_path, tie: bool) -> None:
    model = _tiny_llama(tie)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path)
    back = load_llama_gguf(path)
    assert back.config.tie_word_embeddings is tie
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tie
    _assert_same_model(model, back, torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1)))


def test_tiny_llama_reads_like_transformers(tmp_path) -> None:
    """Names, q/k order and hyper-parameters as transformers' own GGUF loader reads them."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    _write_gguf(_tiny_llama(True), path, q8_embedding=True)
    mine = load_llama_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    _assert_same_model(mine, theirs, torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2)))


def test_errors_name_the_problem(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(bad)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="'gpt2'.*llama.*from_pretrained"):
        load_llama_gguf(other)
    k_quant = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(k_quant), "llama")
    w.add_tensor("token_embd.weight", np.zeros((1, 210), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    _finish(w)
    with pytest.raises(ValueError, match="ggml type 14.*transformers"):
        read_gguf(k_quant)
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))
    with pytest.raises(ValueError, match="big-endian"):
        read_gguf(big)
    scaled = tmp_path / "scaled.gguf"
    _write_gguf(_tiny_llama(True), scaled, rope_scaling=4.0)
    with pytest.raises(ValueError, match="llama.rope.scaling.factor.*from_pretrained"):
        load_llama_gguf(scaled)


def _smollm2_file():
    sd = shared_dir()
    path = sd / "models" / SMOLLM2_DIR / SMOLLM2_GGUF if sd is not None else None
    if path is None or not path.is_file():
        pytest.skip("../shared/models SmolLM2 GGUF not present")
    return path


@pytest.mark.slow
def test_smollm2_identical_to_transformers_loader() -> None:
    """The real Q4_1 file (Q4_1, Q8_0 and F32 tensors): every tensor and the logits equal."""
    from transformers import AutoModelForCausalLM

    path = _smollm2_file()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mine = load_llama_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    _assert_same_model(mine, theirs, torch.arange(100, 164).unsqueeze(0))


def test_smollm2_header_reads() -> None:
    """The real file's header: 272 tensors of the three types, llama metadata, vocabulary length."""
    g = read_gguf(_smollm2_file())
    assert len(g.tensors) == 272
    assert {t.ggml_type for t in g.tensors.values()} == {0, Q4_1, Q8_0}
    assert g.metadata["general.architecture"] == "llama"
    assert g.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert g.tensors["blk.0.attn_q.weight"].shape == (576, 576)
