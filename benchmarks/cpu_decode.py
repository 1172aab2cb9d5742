"""CPU decode and prefill speed: dense float32 / bfloat16 vs awq_ao INT4 vs torchao vs llama.cpp.

Greedy decode (``generate``, a 16-token prompt, 128 new tokens; tokens/s over the decode
steps, timed per step by a logits processor) and prefill (one forward over 512 tokens,
tokens/s), in eager mode and under ``torch.compile`` (static KV cache for decode). Variants
of one model are built once and measured interleaved (rep 1 of every variant, then rep 2,
...), so ratios compare runs made under the same machine load.

    python benchmarks/cpu_decode.py                                 # both models, everything
    python benchmarks/cpu_decode.py --models llama1b --modes eager --reps 2
    python benchmarks/cpu_decode.py --resume                        # continue a stopped run
    python benchmarks/cpu_decode.py --models smollm2 --variants fp32,llamacpp_q4_0 --modes eager \
        --reps 1 --out /tmp/smoke/cpu_decode.json                   # a quick look

Models: ``smollm2`` (SmolLM2-135M, real weights from ../shared) and ``llama1b`` (Llama-3.2-1B
shape: hidden 2048, MLP 8192, 16 layers, 32/8 heads, vocab 128256, tied embeddings; random
weights, which is fine for speed). INT4 is round-to-nearest g128 (speed does not depend on
how the codes were chosen); the embedding and the tied head stay in the model's dtype except
in the ``awq_h8`` variants.

Variants: ``fp32``, ``bf16`` (dense), ``awq_fp32`` / ``awq_bf16`` (awq_ao INT4 from a float32 /
bfloat16 model), ``awq_h8_fp32`` / ``awq_h8_bf16`` (the same, and the tied embedding/head stored
in 8 bits, awq_ao's ``head="int8"``), ``torchao_bf16`` (torchao's ``PrototypeInt4WeightOnlyConfig``: its CPU
tinygemm tensor; on a float32 model it runs ATen's float32 tinygemm, measured 10x slower than
the dense model per layer, so it is not run there), ``llamacpp_q4_0`` (llama.cpp on a Q4_0 GGUF
of the same weights, the CPU anchor).

llama.cpp runs through llama-cpp-python in its own venv, never in the project's:

    bash benchmarks/peers/llamacpp_setup.sh > /tmp/llamacpp_build.log 2>&1   # once, builds
    python benchmarks/cpu_decode.py          # llamacpp_q4_0 is among the default variants

The setup script builds llama-cpp-python 0.3.36 from source for this CPU (``GGML_NATIVE=ON``;
flags and llama.cpp's system info in ``benchmarks/.venvs/llamacpp/build-info.json``, copied
into the summary). Without that venv the variant is skipped, with a message naming the
script, printed and recorded (``"skipped"`` in its build row and in the summary's
``llamacpp``). A worker process (``benchmarks/peers/llamacpp_worker.py``, run by that venv's
python) holds the model and measures on request, so its reps interleave with the others'.
The GGUFs are made once into ``--llamacpp-models`` (default ``benchmarks/.venvs/llamacpp-models``):
SmolLM2 by llama.cpp's quantizer from the shared Q4_1 GGUF (requantized to Q4_0), llama1b by
writing the seed-0 float32 model as an F32 GGUF (synthetic vocabulary) and quantizing that;
llama.cpp's Q4_0 defaults keep the tied embedding/head at Q6_K (Q8_0 when its width is not a
multiple of 256, as SmolLM2's 576); the tensor types are in the build row. llama.cpp runs with
``n_threads`` = torch's thread count, no flash attention, in one mode, ``native``: its reps
run alongside the first mode asked for, and the summary gives its ratios against the dense
models in every mode (``vs_fp32_dense_eager``, ...) and every other variant's ratio against
it (``vs_llamacpp``; issue 13's target: awq_ao decode >= 0.5 of llama.cpp's). Decode is timed
as for the others (greedy argmax of the last logits, tokens/s over the 127 steps after the
prompt's); prefill is one evaluation of the 512 tokens, which in llama.cpp computes the
logits of the last position only (the torch variants' forward computes all 512).

Rows go to ``benchmarks/results/cpu_decode.jsonl`` as they are measured; the summary (medians,
ratios against the dense model of the same dtype, machine, CPU flags, versions) to
``benchmarks/results/cpu_decode.json``; llama.cpp's worker log to ``cpu_decode.llamacpp.log``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # devtools/
    sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LLAMACPP = "llamacpp_q4_0"
VARIANTS = ["fp32", "bf16", "awq_fp32", "awq_bf16", "awq_h8_fp32", "awq_h8_bf16", "torchao_bf16", LLAMACPP]
MODES = ["eager", "compiled"]
MODELS = ["llama1b", "smollm2"]
NATIVE = "native"  # llama.cpp's one mode


def variant_modes(variant: str, modes: list[str]) -> list[str]:
    return [NATIVE] if variant == LLAMACPP else modes


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    info: dict = cpu_info()
    info["torch_threads"] = torch.get_num_threads()
    # kernels restricted below what the CPU has (e.g. ATEN_CPU_CAPABILITY=avx2 on an AVX512 CPU)
    info["isa_limits"] = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                      "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    from awq_ao.lowering.packing import cpu_tinygemm_variant

    info["tinygemm_variant"] = cpu_tinygemm_variant()
    from awq_ao.lowering import cpu_ext

    info["awq_ao_cpp_kernels"] = True if cpu_ext.load() else cpu_ext.unavailable_reason()
    return info


def versions() -> dict:
    import torchao
    import transformers

    import awq_ao

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "torchao": torchao.__version__, "awq_ao": getattr(awq_ao, "__version__", "dev")}


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def llama1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=16, vocab_size=128256,
                       tie_word_embeddings=True, max_position_embeddings=4096)


def build_dense(model_name: str, dtype: torch.dtype):
    if model_name == "smollm2":
        from devtools.shared_data import load_smollm2

        model, _ = load_smollm2(torch.float32)
        return model.to(dtype).eval()
    from transformers import LlamaForCausalLM

    cfg = llama1b_config()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def to_awq_ao(model, group_size: int = 128):
    from awq_ao.lowering.swap import quantize_linear_module

    for name in _linears(model):
        mod = model.get_submodule(name)
        new = quantize_linear_module(mod, 4, group_size, True)
        if new is not mod:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


def to_torchao(model, group_size: int = 128):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    names = set(_linears(model))
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)
    return model


def llamacpp_peer():
    """benchmarks/peers/llamacpp_peer.py (the project-venv side; llama_cpp is never imported here)."""
    peers = str(ROOT / "benchmarks" / "peers")
    if peers not in sys.path:
        sys.path.insert(0, peers)
    import llamacpp_peer as peer

    return peer


def build_llamacpp(model_name: str, args, log: Path):
    """A llama.cpp worker process holding the Q4_0 GGUF of ``model_name``, and what was made."""
    peer = llamacpp_peer()
    threads = torch.get_num_threads()
    cache = Path(args.llamacpp_models)
    config = llama1b_config().to_diff_dict() if model_name == "llama1b" else None
    path, made = peer.prepare_gguf(model_name, lambda: build_dense(model_name, torch.float32),
                                   cache, threads, log, config=config)
    gc.collect()
    worker = peer.Worker(path, threads, n_ctx=max(args.prompt + args.new_tokens, args.prefill) + 8,
                         n_batch=max(args.prefill, 512), log=log)
    return worker, made


def build(model_name: str, variant: str):
    dtype = torch.float32 if variant.endswith("fp32") else torch.bfloat16
    model = build_dense(model_name, dtype)
    if variant.startswith("awq"):
        to_awq_ao(model)
    if variant.startswith("awq_h8"):
        from awq_ao.lowering.head import quantize_head

        quantize_head(model)
    elif variant.startswith("torchao"):
        to_torchao(model)
    return model


def weight_bytes(model) -> dict:
    quant, other = 0, 0
    seen: set[int] = set()
    for _, p in list(model.named_parameters()) + list(model.named_buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "__tensor_flatten__"):
            names, _ = p.__tensor_flatten__()
            quant += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
        else:
            other += p.numel() * p.element_size()
    return {"quantized_mib": round(quant / 2**20, 1), "other_mib": round(other / 2**20, 1)}


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode_tps(model, prompt: torch.Tensor, new_tokens: int, static: bool) -> float:
    from transformers import LogitsProcessorList

    clock = _StepClock()
    kw = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=0, **kw)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    steps = len(clock.times) - 1  # decode steps after the prompt's
    return steps / (clock.times[-1] - clock.times[0])


def prefill_tps(forward, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        forward(ids, use_cache=False)
        return ids.shape[1] / (time.perf_counter() - t0)


def prepare_mode(model, mode: str):
    """Returns the forward used for prefill; for compiled mode also compiles generate's step."""
    model.generation_config.disable_compile = True  # we compile ourselves, once
    if mode == "eager":
        return model.forward
    if not hasattr(model, "_bench_compiled"):
        model._bench_compiled = torch.compile(model.forward, dynamic=False)
        model._bench_eager = model.forward
    model.forward = model._bench_compiled
    return model._bench_compiled


def restore_mode(model) -> None:
    if hasattr(model, "_bench_eager"):
        model.forward = model._bench_eager


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if "value" in r:
            groups.setdefault((r["model"], r["variant"], r["mode"], r["metric"]), []).append(r["value"])
    out = []
    for (model, variant, mode, metric), vals in sorted(groups.items()):
        med = statistics.median(vals)
        base = "fp32" if variant.endswith("fp32") else "bf16"
        ref = groups.get((model, base, mode, metric))
        row = {"model": model, "variant": variant, "mode": mode, "metric": metric,
               "median_tok_s": round(med, 2), "runs": [round(v, 2) for v in vals]}
        if ref and variant != base:
            row[f"vs_{base}_dense"] = round(med / statistics.median(ref), 2)
        fp = groups.get((model, "fp32", mode, metric))
        if fp and variant != "fp32":
            row["vs_fp32_dense"] = round(med / statistics.median(fp), 2)
        if variant == LLAMACPP:  # one mode of its own: against the dense models in every mode
            for (m2, v2, md2, k2), vals2 in sorted(groups.items()):
                if m2 == model and k2 == metric and v2 in ("fp32", "bf16"):
                    row[f"vs_{v2}_dense_{md2}"] = round(med / statistics.median(vals2), 2)
        else:
            lc = groups.get((model, LLAMACPP, NATIVE, metric))
            if lc:  # the target: awq_ao decode within 2x of llama.cpp (>= 0.5)
                row["vs_llamacpp"] = round(med / statistics.median(lc), 2)
        out.append(row)
    return out


def measure_model(model_name: str, models: dict, args, prompt, long_ids, done: set, record) -> None:
    """Warm-up, then rep 1 of every variant, rep 2, ... per mode. llama.cpp has one mode of its
    own: its reps run interleaved with the first mode (of those asked) that still needs them."""
    lc_prompt, lc_long = prompt[0].tolist(), long_ids[0].tolist()
    lc_warm = False
    for mode in args.modes.split(","):
        lc_todo = LLAMACPP in models and any(
            (model_name, LLAMACPP, NATIVE, k, r) not in done
            for k in ("decode", "prefill") for r in range(args.reps))
        for v, model in models.items():  # warm-up / compile, not timed
            if v == LLAMACPP:
                if not lc_todo or lc_warm:
                    continue
                t0 = time.perf_counter()
                model.decode(lc_prompt, args.new_tokens)
                model.prefill(lc_long)
                lc_warm = True
                record({"model": model_name, "variant": v, "mode": NATIVE, "metric": "warmup",
                        "rep": -1, "seconds": round(time.perf_counter() - t0, 1)})
                continue
            fwd = prepare_mode(model, mode)
            t0 = time.perf_counter()
            # the full length: a static cache of another length would compile again when timed
            decode_tps(model, prompt, args.new_tokens, static=mode == "compiled")
            prefill_tps(fwd, long_ids)
            record({"model": model_name, "variant": v, "mode": mode, "metric": "warmup",
                    "rep": -1, "seconds": round(time.perf_counter() - t0, 1)})
            restore_mode(model)
        for rep in range(args.reps):
            for v, model in models.items():
                if v == LLAMACPP:
                    for metric in ("decode", "prefill"):
                        if (model_name, v, NATIVE, metric, rep) in done:
                            continue
                        val = (model.decode(lc_prompt, args.new_tokens) if metric == "decode"
                               else model.prefill(lc_long))
                        record({"model": model_name, "variant": v, "mode": NATIVE, "metric": metric,
                                "rep": rep, "value": round(val, 3)})
                    continue
                fwd = prepare_mode(model, mode)
                for metric in ("decode", "prefill"):
                    if (model_name, v, mode, metric, rep) in done:
                        continue
                    if metric == "decode":
                        val = decode_tps(model, prompt, args.new_tokens, static=mode == "compiled")
                    else:
                        val = prefill_tps(fwd, long_ids)
                    record({"model": model_name, "variant": v, "mode": mode, "metric": metric,
                            "rep": rep, "value": round(val, 3)})
                restore_mode(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "cpu_decode.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the .jsonl")
    ap.add_argument("--llamacpp-models", default=str(ROOT / "benchmarks" / ".venvs" / "llamacpp-models"),
                    help="cache folder for the Q4_0 GGUFs of the llama.cpp variant")
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    out = Path(args.out)
    rows_path = out.with_suffix(".jsonl")
    rows: list[dict] = []
    if args.resume and rows_path.exists():
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    elif rows_path.exists():
        rows_path.unlink()
    done = {(r["model"], r["variant"], r["mode"], r["metric"], r["rep"]) for r in rows}
    header = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": dt.datetime.now().isoformat(timespec="seconds"),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()],
              "machine": machine_info(), "versions": versions(),
              "settings": {"prompt": args.prompt, "new_tokens": args.new_tokens,
                           "prefill": args.prefill, "group_size": 128, "reps": args.reps}}
    print(json.dumps(header["machine"]))

    llamacpp: dict = {}  # what the llama.cpp variant ran with, or why it did not run
    llamacpp_log = out.with_suffix(".llamacpp.log")

    def record(row: dict) -> None:
        rows.append(row)
        if "value" in row:
            done.add((row["model"], row["variant"], row["mode"], row["metric"], row["rep"]))
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for model_name in args.models.split(","):
        variants = [v for v in args.variants.split(",") if v]
        models = {}
        for v in variants:
            if all((model_name, v, m, k, r) in done for m in variant_modes(v, args.modes.split(","))
                   for k in ("decode", "prefill") for r in range(args.reps)):
                continue
            t0 = time.perf_counter()
            if v == LLAMACPP:
                why = llamacpp_peer().missing()
                if why:  # not silent: printed, and kept in the rows and the summary
                    print(f"SKIPPED {v}: {why}", file=sys.stderr, flush=True)
                    llamacpp["skipped"] = why
                    record({"model": model_name, "variant": v, "mode": "-", "metric": "build",
                            "rep": -1, "skipped": why})
                    continue
                try:
                    models[v], made = build_llamacpp(model_name, args, llamacpp_log)
                except Exception as e:
                    record({"model": model_name, "variant": v, "mode": "-", "metric": "build",
                            "rep": -1, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                llamacpp.setdefault("build", llamacpp_peer().build_info())
                llamacpp[model_name] = models[v].info
                record({"model": model_name, "variant": v, "mode": "-", "metric": "build", "rep": -1,
                        "seconds": round(time.perf_counter() - t0, 1), "gguf_mib": made["gguf_mib"],
                        "tensor_types": made["tensor_types"]["counts"], "gguf_cached": made["cached"],
                        "n_threads": models[v].info["n_threads"]})
                continue
            try:
                models[v] = build(model_name, v)
            except Exception as e:  # a peer that cannot run here: say so in the results
                record({"model": model_name, "variant": v, "mode": "-", "metric": "build",
                        "rep": -1, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            record({"model": model_name, "variant": v, "mode": "-", "metric": "build", "rep": -1,
                    "seconds": round(time.perf_counter() - t0, 1), **weight_bytes(models[v])})
        gen = torch.Generator().manual_seed(0)
        first = next(iter(models.values()), None)
        vocab = (first.config.vocab_size if hasattr(first, "config") else first.vocab_size) if models else 1000
        prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)
        long_ids = torch.randint(0, vocab, (1, args.prefill), generator=gen)
        try:
            measure_model(model_name, models, args, prompt, long_ids, done, record)
        finally:
            if LLAMACPP in models:
                models[LLAMACPP].close()
        del models
        gc.collect()
        torch._dynamo.reset()
    from awq_ao.lowering.cpu_kernels import chosen_paths

    summary = {**header, "cpu_paths": {" ".join(map(str, k)): v for k, v in chosen_paths().items()},
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "llamacpp": llamacpp, "builds": [r for r in rows if r["metric"] == "build"],
               "results": _summary(rows)}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{'model':8} {'variant':13} {'mode':8} {'metric':7} {'tok/s':>9}  ratios")
    for r in summary["results"]:
        ratios = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith("vs_"))
        print(f"{r['model']:8} {r['variant']:13} {r['mode']:8} {r['metric']:7} {r['median_tok_s']:9.2f}  {ratios}")
    if "skipped" in llamacpp:
        print(f"\n{LLAMACPP} SKIPPED: {llamacpp['skipped']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
