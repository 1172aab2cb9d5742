"""The llama.cpp peer of ``benchmarks/cpu_decode.py``, seen from the project's venv.

llama.cpp (through llama-cpp-python) lives in its own venv, ``benchmarks/.venvs/llamacpp``
(``bash benchmarks/peers/llamacpp_setup.sh``); this module never imports it. It

- makes the Q4_0 GGUFs, cached in ``benchmarks/.venvs/llamacpp-models`` (ignored by git):
  ``smollm2``: llama.cpp's quantizer requantizes the shared Q4_1 GGUF (the file whose
  dequantized weights the torch variants load) to Q4_0; ``llama1b``: the random-weight model
  the benchmark builds (``build_dense(..., float32)``, seed 0) is written here as an F32 GGUF
  with the ``gguf`` package (llama.cpp's tensor names, q/k rows permuted to llama.cpp's rope
  layout, a synthetic SentencePiece-style vocabulary of the model's size: only speed is
  measured), then quantized to Q4_0 and the F32 file deleted. The quantizer runs with
  llama.cpp's defaults for Q4_0, so the tied embedding/head is not Q4_0 (Q6_K or Q8_0, as
  llama-quantize makes it); the tensor types are recorded with the results.
- runs ``llamacpp_worker.py serve`` under that venv's python and talks JSON lines to it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # devtools/
    sys.path.insert(0, str(ROOT))
VENV = ROOT / "benchmarks" / ".venvs" / "llamacpp"
SETUP = "benchmarks/peers/llamacpp_setup.sh"
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
DEFAULT_CACHE = ROOT / "benchmarks" / ".venvs" / "llamacpp-models"


def python() -> Path:
    return VENV / "bin" / "python"


def missing() -> str | None:
    """Why the llama.cpp variant cannot run here, or None when its venv is ready."""
    if not python().is_file() or not (VENV / ".llamacpp-installed").is_file():
        return (f"llama.cpp venv missing ({VENV.relative_to(ROOT)}): "
                f"run `bash {SETUP}` to build llama-cpp-python, then rerun")
    return None


def build_info() -> dict:
    p = VENV / "build-info.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _run_worker(args: list[str], log: Path) -> dict:
    with log.open("a") as err:
        proc = subprocess.run([str(python()), str(WORKER), *args], stdout=subprocess.PIPE,
                              stderr=err, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    out = json.loads(lines[-1]) if lines else {"error": f"no answer (exit {proc.returncode})"}
    if proc.returncode != 0 or "error" in out:
        raise RuntimeError(f"llama.cpp worker {args[0]}: {out.get('error')} (log: {log})")
    return out


# --------------------------------------------------------------------------------------------
# GGUFs
# --------------------------------------------------------------------------------------------


def _permute_rope(w, n_head: int):
    """HF q/k rows (each head: first half, second half of the rotary pairs) -> llama.cpp's
    interleaved pairs (rows 2i, 2i+1 of a head are HF rows i, i + head_dim/2)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(model, path: Path) -> None:
    """An HF LlamaForCausalLM as an F32 llama-architecture GGUF with a synthetic vocabulary."""
    import gguf
    import torch

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("awq_ao cpu_decode llama1b (random weights, seed 0)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # synthetic vocabulary: <unk> <s> </s>, the 256 byte tokens, then placeholder pieces
    n_special = 3
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (cfg.vocab_size - 259))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_special + [0.0] * 256 + [-float(i) for i in range(cfg.vocab_size - 259)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def f32(t):
        return t.detach().to(torch.float32).contiguous().numpy()

    inner = model.model
    w.add_tensor("token_embd.weight", f32(inner.embed_tokens.weight))
    w.add_tensor("output_norm.weight", f32(inner.norm.weight))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", f32(model.lm_head.weight))
    for i, layer in enumerate(inner.layers):
        at, mlp = layer.self_attn, layer.mlp
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(layer.input_layernorm.weight))
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_rope(f32(at.q_proj.weight), n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_rope(f32(at.k_proj.weight), n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(at.v_proj.weight))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(at.o_proj.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(layer.post_attention_layernorm.weight))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(mlp.gate_proj.weight))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f32(mlp.up_proj.weight))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(mlp.down_proj.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prepare_gguf(model_name: str, build_f32: Callable, cache: Path, threads: int, log: Path,
                 config: dict | None = None) -> tuple[Path, dict]:
    """The cached Q4_0 GGUF of ``model_name`` (made when missing or made from another recipe).

    ``build_f32()`` builds the float32 HF model (only called when the GGUF must be made);
    ``config`` (its config as a dict) is part of the cache key."""
    cache.mkdir(parents=True, exist_ok=True)
    recipe: dict = {"llama_cpp_python": build_info().get("llama_cpp_python"), "ftype": "Q4_0"}
    if model_name == "smollm2":
        from devtools.shared_data import smollm2_path

        d, name = smollm2_path()
        src = d / name
        recipe.update(source=str(src), source_bytes=src.stat().st_size)
    else:
        import torch  # the random initialization depends on torch's version

        recipe.update(source="cpu_decode.build_dense(float32), seed 0", config=config,
                      torch=torch.__version__)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    dst = cache / f"{model_name}-{key}.Q4_0.gguf"
    meta = dst.with_suffix(".json")
    if dst.is_file() and meta.is_file():
        return dst, {**json.loads(meta.read_text()), "cached": True}
    t0 = time.perf_counter()
    if model_name == "smollm2":
        made = _run_worker(["quantize", str(src), str(dst), "--threads", str(threads)], log)
    else:
        f32 = cache / f"{model_name}-{key}.F32.gguf"
        try:
            model = build_f32()  # the fp32 variant's exact weights
            write_llama_gguf(model, f32)
            del model
            made = _run_worker(["quantize", str(f32), str(dst), "--threads", str(threads)], log)
        finally:
            f32.unlink(missing_ok=True)
    info = {"gguf": str(dst), "recipe": recipe, "made_seconds": round(time.perf_counter() - t0, 1),
            "gguf_mib": made["mib"], "tensor_types": made["tensor_types"]}
    meta.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return dst, {**info, "cached": False}


# --------------------------------------------------------------------------------------------
# the worker
# --------------------------------------------------------------------------------------------


class Worker:
    """A ``llamacpp_worker.py serve`` process holding one model; measures on request."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int, n_batch: int, log: Path) -> None:
        self.log = log
        self._err = log.open("a")
        self.proc = subprocess.Popen(
            [str(python()), str(WORKER), "serve", str(gguf_path), "--threads", str(threads),
             "--n-ctx", str(n_ctx), "--n-batch", str(n_batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.info = self._read()
        self.vocab_size = self.info["n_vocab"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"llama.cpp worker exited (code {self.proc.poll()}); see {self.log}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"llama.cpp worker: {out['error']} (log: {self.log})")
        return out

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        out = self._ask({"op": "decode", "prompt": prompt, "new_tokens": new_tokens})
        assert len(out["tokens"]) == new_tokens
        return out["value"]

    def prefill(self, ids: list[int]) -> float:
        return self._ask({"op": "prefill", "ids": ids})["value"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


if __name__ == "__main__":  # `python benchmarks/peers/llamacpp_peer.py`: is the peer ready?
    why = missing()
    print(why or f"llama.cpp venv ready: {VENV}\n{json.dumps(build_info(), indent=1)}")
    sys.exit(1 if why else 0)
