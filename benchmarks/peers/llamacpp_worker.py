"""llama.cpp side of ``benchmarks/cpu_decode.py``: runs in benchmarks/.venvs/llamacpp, not in .venv.

Made by ``benchmarks/peers/llamacpp_setup.sh``; started by ``benchmarks/peers/llamacpp_peer.py``.
It only imports llama_cpp, gguf and numpy. Every answer is one JSON line on stdout; whatever
llama.cpp itself prints goes to stderr (fd 1 is pointed at fd 2 before llama_cpp loads).

    python llamacpp_worker.py info
    python llamacpp_worker.py quantize SRC.gguf DST.gguf --threads 2     # to Q4_0
    python llamacpp_worker.py serve MODEL.gguf --threads 2 --n-ctx 1024 --n-batch 512

``serve`` loads the model once, prints a ready line, then answers one request per stdin line:
``{"op": "decode", "prompt": [ids], "new_tokens": 128}`` (greedy; tokens/s over the decode
steps after the prompt's, as the torch variants time them), ``{"op": "prefill", "ids": [ids]}``
(one evaluation of the whole prompt, tokens/s) and ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

_PROTO = os.fdopen(os.dup(1), "w", buffering=1)  # the JSON channel
os.dup2(2, 1)  # anything else printed to stdout (C code included) lands on stderr
sys.stdout = sys.stderr


def _say(obj: dict) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def _info() -> dict:
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def _tensor_types(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    named = {t.name: t.tensor_type.name for t in reader.tensors
             if t.name in ("token_embd.weight", "output.weight")}
    return {"counts": dict(sorted(counts.items())), **named}


def quantize(src: str, dst: str, threads: int) -> dict:
    """llama.cpp's own quantizer with its defaults for Q4_0 (what llama-quantize Q4_0 makes)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True  # the SmolLM2 source is Q4_1/Q8_0: dequantized, then Q4_0
    tmp = dst + ".part"
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}) returned {rc}")
    os.replace(tmp, dst)
    return {"dst": dst, "seconds": round(time.perf_counter() - t0, 1),
            "mib": round(os.path.getsize(dst) / 2**20, 1), "tensor_types": _tensor_types(dst)}


class _Runner:
    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int) -> None:
        import llama_cpp
        import numpy as np

        self._np, self._lc = np, llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                                   flash_attn=False, logits_all=False, verbose=False)
        self.load_seconds = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def decode(self, prompt: list[int], new_tokens: int) -> dict:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        tok = self._argmax()
        times, out = [time.perf_counter()], [tok]
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = self._argmax()
            out.append(tok)
            times.append(time.perf_counter())
        steps = len(times) - 1  # decode steps after the prompt's
        return {"value": steps / (times[-1] - times[0]), "tokens": out}

    def prefill(self, ids: list[int]) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)  # one llama_decode when len(ids) <= n_batch
        self._lc.llama_synchronize(llm.ctx)
        return {"value": len(ids) / (time.perf_counter() - t0)}


def serve(path: str, threads: int, n_ctx: int, n_batch: int) -> None:
    runner = _Runner(path, threads, n_ctx, n_batch)
    _say({"ready": True, "n_vocab": runner.n_vocab, "load_seconds": round(runner.load_seconds, 2),
          "n_threads": threads, "n_ctx": n_ctx, "n_batch": n_batch, "flash_attn": False,
          "gguf_mib": round(os.path.getsize(path) / 2**20, 1),
          "tensor_types": _tensor_types(path), **_info()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "decode":
                _say(runner.decode(req["prompt"], req["new_tokens"]))
            elif req["op"] == "prefill":
                _say(runner.prefill(req["ids"]))
            else:
                _say({"error": f"unknown op {req['op']!r}"})
        except Exception as e:  # answer, so the caller does not wait forever
            _say({"error": f"{type(e).__name__}: {e}"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--threads", type=int, default=os.cpu_count())
    s = sub.add_parser("serve")
    s.add_argument("model")
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--n-ctx", type=int, default=1024)
    s.add_argument("--n-batch", type=int, default=512)
    args = ap.parse_args()
    try:
        if args.cmd == "info":
            _say(_info())
        elif args.cmd == "quantize":
            _say(quantize(args.src, args.dst, args.threads))
        else:
            serve(args.model, args.threads, args.n_ctx, args.n_batch)
    except Exception as e:
        _say({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
