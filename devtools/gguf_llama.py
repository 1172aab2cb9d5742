"""Load a Llama-architecture GGUF file (F32/F16/Q4_0/Q4_1/Q8_0 tensors) as a transformers model.

The project's development model, SmolLM2-135M, ships as a Q4_1 GGUF. transformers can load it
(``from_pretrained(..., gguf_file=...)``), but on the 2-core CI machine that takes 15-20 s:
it parses the file's metadata twice, element by element (the tokenizer's ~100k strings), and
rebuilds a tensor-name table once per tensor. This reader parses the header once with
``struct`` on a memory map, skips the string arrays without keeping them, dequantizes the
three block formats it meets with a few vectorized torch operations, undoes the Q/K row
permutation that llama.cpp's converter applies, and fills a ``LlamaForCausalLM`` built from
the file's own hyper-parameters. The result is bit-identical to transformers' GGUF loader
(``tests/test_gguf_llama.py`` compares every tensor and the logits).

Anything else (another architecture, a K-quant or other block type) raises ``ValueError``
naming what was found and pointing at transformers' loader; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GGUFFile", "read_gguf", "dequantize", "llama_state_dict", "llama_config", "load_llama_gguf"]

# GGUF metadata value types (the GGUF specification's gguf_metadata_value_type)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types read here: name, elements per block, bytes per block
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_BLOCKS = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q4_1: ("Q4_1", 32, 20),
           Q8_0: ("Q8_0", 32, 34)}


@dataclass
class TensorInfo:
    """One tensor of a GGUF file: its ggml type, torch shape (rows first) and absolute offset."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int

    @property
    def n_bytes(self) -> int:
        _, per_block, block_bytes = _BLOCKS[self.ggml_type]
        return int(np.prod(self.shape)) // per_block * block_bytes


@dataclass
class GGUFFile:
    """The parsed header of a GGUF file: metadata (string arrays as their lengths only), tensors."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def raw(self, name: str) -> torch.Tensor:
        """The bytes of tensor ``name`` (a uint8 tensor copied out of the file)."""
        info = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            buf = f.read(info.n_bytes)
        if len(buf) != info.n_bytes:
            raise ValueError(f"{self.path}: tensor {name} is cut short ({len(buf)} of {info.n_bytes} bytes)")
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        raise ValueError(f"unexpected GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (versions 2 and 3).

    Numeric arrays are kept as lists; string arrays (the tokenizer's vocabulary and merges) are
    skipped and only their lengths kept in ``array_lengths``.
    """
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3) and struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise ValueError(f"{path} is a big-endian GGUF file; this reader reads little-endian ones only")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        out = GGUFFile(path, version)
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            if vtype != _ARRAY:
                out.metadata[key] = cur.value(vtype)
                continue
            etype, count = cur.unpack("<I"), cur.unpack("<Q")
            out.array_lengths[key] = count
            if etype == _STRING:
                for _ in range(count):
                    cur.skip_string()
            elif etype in _SCALAR:
                fmt = _SCALAR[etype]
                size = struct.calcsize(fmt)
                out.metadata[key] = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, cur.pos))
                cur.pos += size * count
            else:
                raise ValueError(f"{path}: metadata {key} is an array of type {etype}, not read here")
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, ggml_type, tuple(reversed(dims)), offset))
        align = int(out.metadata.get("general.alignment", 32))
        if align <= 0:
            raise ValueError(f"{path}: general.alignment is {align}; it must be a positive number of bytes")
        data_start = (cur.pos + align - 1) // align * align
    for name, ggml_type, shape, offset in infos:
        if ggml_type not in _BLOCKS:
            raise ValueError(
                f"{path}: tensor {name} has ggml type {ggml_type}, which this reader does not "
                f"dequantize (it reads {', '.join(n for n, _, _ in _BLOCKS.values())}); load the "
                "file with transformers' from_pretrained(..., gguf_file=...) instead."
            )
        out.tensors[name] = TensorInfo(name, ggml_type, shape, data_start + offset)
    return out


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block (``[n, block_bytes]`` uint8), as float32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of one tensor's bytes ``raw`` (uint8), in the torch ``shape``.

    Q4_0: ``d * (q - 8)``; Q4_1: ``d * q + m``; Q8_0: ``d * q``, per block of 32 with ``d`` (and
    ``m``) float16; in a Q4 block byte ``j`` holds element ``j`` in its low nibble and
    ``j + 16`` in its high nibble. Computed in float32 as ggml's reference does.
    """
    if ggml_type not in _BLOCKS:
        raise ValueError(f"ggml type {ggml_type} is not one of {sorted(_BLOCKS)}")
    numel = int(np.prod(shape))
    if ggml_type == F32:
        return raw.view(torch.float32)[:numel].clone().reshape(shape)
    if ggml_type == F16:
        return raw.view(torch.float16)[:numel].float().reshape(shape)
    _, per_block, block_bytes = _BLOCKS[ggml_type]
    if numel % per_block:
        raise ValueError(f"{numel} elements are not a whole number of {per_block}-element blocks")
    blocks = raw[: numel // per_block * block_bytes].reshape(-1, block_bytes)
    d = _halves(blocks, 0)
    if ggml_type == Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(shape)
    qs = blocks[:, 4:] if ggml_type == Q4_1 else blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    if ggml_type == Q4_0:
        return (d * (q - 8.0)).reshape(shape)
    return (d * q + _halves(blocks, 2)).reshape(shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row interleave of a q/k projection (``[n_head * head_dim, K]``)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _require_llama(g: GGUFFile) -> None:
    arch = g.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{g.path}: architecture {arch!r}; this reader loads 'llama' GGUF files only. Load it "
            "with transformers' from_pretrained(..., gguf_file=...) instead."
        )


def llama_config(g: GGUFFile) -> Any:
    """A ``LlamaConfig`` from the file's ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    from transformers import LlamaConfig

    _require_llama(g)
    m = g.metadata
    scaling = sorted(k for k in m if k.startswith("llama.rope.scaling."))
    if scaling:
        raise ValueError(
            f"{g.path}: rotary scaling ({', '.join(scaling)}) is not read here; load the file with "
            "transformers' from_pretrained(..., gguf_file=...) instead."
        )
    heads = int(m["llama.attention.head_count"])
    hidden = int(m["llama.embedding_length"])
    vocab = int(m.get("llama.vocab_size", g.array_lengths.get("tokenizer.ggml.tokens", 0)))
    head_dim = int(m.get("llama.attention.key_length", m.get("llama.rope.dimension_count", hidden // heads)))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(m["llama.feed_forward_length"]),
        num_hidden_layers=int(m["llama.block_count"]), num_attention_heads=heads,
        num_key_value_heads=int(m.get("llama.attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(m["llama.context_length"]),
        rms_norm_eps=float(m["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(m.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=m.get("tokenizer.ggml.bos_token_id"), eos_token_id=m.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=m.get("tokenizer.ggml.padding_token_id"),
    )


def llama_state_dict(g: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a llama GGUF file under its transformers ``LlamaForCausalLM`` name."""
    _require_llama(g)
    heads = int(g.metadata["llama.attention.head_count"])
    kv_heads = int(g.metadata.get("llama.attention.head_count_kv", heads))
    out: dict[str, torch.Tensor] = {}
    for name, info in g.tensors.items():
        stem, _, suffix = name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
        elif stem in _TOP_NAMES:
            hf = f"{_TOP_NAMES[stem]}.{suffix}"
        else:
            raise ValueError(f"{g.path}: tensor {name} has no LlamaForCausalLM counterpart here")
        w = dequantize(g.raw(name), info.ggml_type, info.shape)
        if stem.endswith("attn_q"):
            w = _unpermute(w, heads)
        elif stem.endswith("attn_k"):
            w = _unpermute(w, kv_heads)
        out[hf] = w.to(dtype)
    return out


def load_llama_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``LlamaForCausalLM`` (eval mode) holding the dequantized weights of the GGUF at ``path``."""
    from transformers import LlamaForCausalLM

    g = read_gguf(path)
    config = llama_config(g)
    state = llama_state_dict(g, dtype)
    try:  # every weight is overwritten below: skip the random initialization (~5 s here)
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, then overwrite
        no_init_weights = contextlib.nullcontext
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for LlamaForCausalLM")
    model.tie_weights()
    model.config.dtype = dtype
    return model.eval()
