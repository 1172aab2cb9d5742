"""The ``awq-ao`` command line: quantize a model, evaluate a saved one, describe a checkpoint.

::

    awq-ao quantize MODEL --out DIR [--bits 4] [--group-size 128] [--calib FILE] ...
    awq-ao eval DIR --text FILE [--windows N] [--seq-len 2048]
    awq-ao info DIR [--layers] [--json] [--verify]

Failures exit with status 1 and a one-line ``awq-ao: error: ...`` on stderr (``--debug``
shows the traceback); bad arguments exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "load_source_model", "load_calibration_text"]

_TEXT_BUILDERS = {".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text",
                  ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------
# helpers (importable for scripts and tests)
# ------------------------------------------------------------------------------------------------


def _int_type(lo: int, accepted: str, also: tuple[int, ...] = ()) -> Any:
    """An argparse ``type=``: an integer >= ``lo`` (or one of ``also``); the message says what
    is accepted (argparse prefixes the option's name)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; accepted: {accepted}") from None
        if value < lo and value not in also:
            raise argparse.ArgumentTypeError(f"{value} is out of range; accepted: {accepted}")
        return value

    parse.__name__ = "integer"
    return parse


def _bits_type(text: str) -> int:
    """argparse ``type=`` for ``--bits``."""
    from awq_ao.lowering.quant_math import SUPPORTED_BITS

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: an integer in {', '.join(map(str, SUPPORTED_BITS))}")
    return value


def _size_type(text: str) -> int:
    """argparse ``type=`` for ``--max-shard-size`` (checked when parsing, before any work)."""
    from awq_ao.checkpoint.save import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; accepted: a positive number of bytes or e.g. 2GB, 500MB, 64KiB"
        ) from None


def _check_device(device: str) -> None:
    """Fail before loading anything for a device name torch does not know or cannot use here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise CLIError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto.")
    return d


def load_source_model(
    spec: str, dtype: Any = None, allow_download: bool = False, gguf_file: str | None = None
) -> tuple[Any, Any]:
    """Load the full-precision model to quantize and its tokenizer.

    ``spec`` is a local transformers model directory, a directory (or file) with a ``.gguf``
    (dequantized by transformers; needs ``gguf``), or a Hugging Face Hub id. A hub id is only
    downloaded with ``allow_download=True``; otherwise only the local cache is used.

    Code shipped with a model is never run: every transformers call passes
    ``trust_remote_code=False``, and a local folder whose ``config.json`` or
    ``tokenizer_config.json`` has an ``auto_map`` is refused (naming the file) before
    transformers reads it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awq_ao.checkpoint.formats import refuse_custom_code

    p = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if p.is_dir():
        refuse_custom_code(p)
        cfg = p / "config.json"
        if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text(encoding="utf-8")):
            raise CLIError(f"{p} holds an already quantized model; start from the full-precision one.")
        weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if gguf_file is None and not weights and ggufs:
            if len(ggufs) > 1:
                raise CLIError(f"{p} has several .gguf files ({', '.join(ggufs)}); pass --gguf-file.")
            gguf_file = ggufs[0]
        if gguf_file is None and not weights:
            raise CLIError(f"{p} has no model weights (*.safetensors, *.bin or *.gguf).")
        if gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(str(p), gguf_file=gguf_file, local_files_only=True, **kwargs)
            if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
            else:
                tok = AutoTokenizer.from_pretrained(str(p), gguf_file=gguf_file, local_files_only=True, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        return model.eval(), tok
    if p.exists():
        raise CLIError(f"{spec} is not a model directory or a .gguf file.")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CLIError(f"{spec}: no such directory.")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=not allow_download, **kwargs)
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=not allow_download, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if not allow_download:
            raise CLIError(
                f"{spec} is not a local directory and is not in the Hugging Face cache; pass "
                "--allow-download to fetch it from the Hub."
            ) from e
        raise
    return model.eval(), tok


def load_calibration_text(path: str | None, text_field: str = "text") -> str:
    """Calibration text from a text file, a ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a
    folder of such files, or a folder written by ``datasets.save_to_disk``.

    Dataset rows (the ``text_field`` column) are joined with blank lines. ``None`` uses the
    project's default calibration text (``shared/data/calibration/wiki.valid.tokens``).
    """
    if path is None:
        from awq_ao.evaluation import calibration_text

        try:
            return calibration_text()
        except FileNotFoundError as e:
            raise CLIError("no default calibration text found; pass --calib FILE.") from e
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"calibration data {p} does not exist.")
    import datasets

    def rows_of(ds: Any) -> str:
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if text_field not in ds.column_names:
            raise CLIError(f"{p}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); pass --text-field.")
        return "\n\n".join(str(r) for r in ds[text_field] if r)

    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return rows_of(datasets.load_from_disk(str(p)))
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_BUILDERS)
        if not files:
            raise CLIError(f"{p}: no text/json/jsonl/parquet/csv files.")
        builders = {_TEXT_BUILDERS[f.suffix.lower()] for f in files}
        if len(builders) > 1:
            raise CLIError(f"{p}: mixes file types ({', '.join(sorted(builders))}); keep one kind.")
        builder = builders.pop()
        data_files = [str(f) for f in files]
    else:
        builder = _TEXT_BUILDERS.get(p.suffix.lower(), "plain")
        if builder in ("text", "plain"):
            return p.read_text(encoding="utf-8", errors="replace")
        data_files = [str(p)]
    with tempfile.TemporaryDirectory(prefix="awq_ao_ds_") as cache:
        ds = datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache)
        return rows_of(ds)


def _eval_text(path: Path, mode: str) -> str:
    from awq_ao.evaluation import wikitext_test_text

    if mode == "wikitext" or (mode == "auto" and path.suffix == ".raw" and "wiki" in path.name):
        return wikitext_test_text(path)
    return path.read_text(encoding="utf-8", errors="replace")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _precheck_format(model: Any, fmt: str, bits: int, group_size: int) -> None:
    """Fail before the (long) quantization when the target format cannot hold the result."""
    if fmt == "awq_ao":
        return
    from awq_ao.passes.experts import is_experts_module

    moe = [name for name, mod in model.named_modules() if is_experts_module(mod)]
    if moe:
        raise CLIError(
            f"--format {fmt} cannot hold INT4 MoE experts ({', '.join(moe[:3])}{' ...' if len(moe) > 3 else ''}); "
            "use --format awq_ao."
        )
    if fmt == "autoawq" and bits != 4:
        raise CLIError(f"--format autoawq stores 4-bit weights only (got --bits {bits}).")
    if group_size == -1:
        return
    from awq_ao.lowering.swap import is_quantizable_linear

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    bad = []
    for name, mod in model.named_modules():
        if not is_quantizable_linear(mod) or name.endswith("lm_head"):
            continue
        if emb is not None and getattr(mod, "weight", None) is getattr(emb, "weight", 0):
            continue
        k = mod.in_features if hasattr(mod, "in_features") else mod.weight.shape[0]
        if k % group_size:
            bad.append(f"{name} (in_features={k})")
    if bad:
        raise CLIError(
            f"--format {fmt} needs in_features divisible by --group-size {group_size}; not so for "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Use --format awq_ao (ragged groups are fine) "
            "or another group size."
        )


# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    """``awq-ao quantize``."""
    import torch

    import awq_ao
    from awq_ao.checkpoint import save_quantized
    from awq_ao.checkpoint.save import check_output_dir
    from awq_ao.evaluation import batches, calibration_blocks

    # every argument is checked before the (slow) model load
    if args.sequential and args.in_memory:
        raise CLIError("--sequential and --in-memory exclude each other: pick one (or neither: automatic).")
    if args.spill_dir and args.in_memory:
        raise CLIError("--spill-dir needs layer-by-layer convert: drop --in-memory.")
    if args.fallback == "multiply" and args.format != "awq_ao":
        raise CLIError(
            f"--fallback multiply adds input scales that --format {args.format} cannot hold; "
            "use --fallback skip or --format awq_ao."
        )
    if args.calib is not None and not Path(args.calib).expanduser().exists():
        raise CLIError(f"calibration data {Path(args.calib).expanduser()} does not exist.")
    _check_device(args.device)
    source = Path(args.model).expanduser()
    source = source.parent if source.is_file() else source
    check_output_dir(args.out, args.overwrite, [source] if source.is_dir() else [])
    dtype = _torch_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    _log(args, f"loading {args.model} ({str(dtype).removeprefix('torch.')}) ...")
    model, tok = load_source_model(args.model, dtype, args.allow_download, args.gguf_file)
    # layer-by-layer: the model stays on the CPU and each block visits the device in turn
    home = "cpu" if args.sequential else args.device
    model.to(home)
    _precheck_format(model, args.format, args.bits, args.group_size)
    text = load_calibration_text(args.calib, args.text_field)
    try:
        blocks = calibration_blocks(tok, text, args.n_samples, args.seq_len)
    except ValueError as e:
        raise CLIError(str(e)) from e
    _log(args, f"calibration: {blocks.shape[0]} x {blocks.shape[1]} tokens; loaded in {time.perf_counter() - t0:.1f}s")
    fallback = args.fallback or ("multiply" if args.format == "awq_ao" else "skip")
    calib = [b.to(home) for b in batches(blocks, args.batch_size)]
    if args.sequential:
        layerwise = dict(sequential=True, device=None if args.device == "cpu" else args.device, spill_dir=args.spill_dir)
    elif args.in_memory:
        layerwise = dict(sequential=False)
    else:  # automatic: layer by layer where one block stack holds the linears, blocks stay where the model is
        layerwise = dict(spill_dir=args.spill_dir)
    with torch.no_grad():
        report = awq_ao.quantize(
            model,
            calib,
            bits=args.bits,
            group_size=args.group_size,
            zero_point=not args.no_zero_point,
            fallback=fallback,
            max_search_samples=args.search_samples,
            rounding=args.rounding,
            progress=not args.no_progress,
            verbose=False,
            **layerwise,
        )
    if not args.quiet:
        print(report.summary())
    out = save_quantized(
        model, args.out, tokenizer=tok, format=args.format, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, progress=not args.no_progress, dtype=args.save_dtype,
    )
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved {args.format} checkpoint to {out} ({_human(size)}) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``awq-ao eval``: perplexity of a saved quantized model."""
    import torch
    from transformers import AutoTokenizer

    from awq_ao.checkpoint import load_quantized
    from awq_ao.checkpoint.formats import refuse_custom_code
    from awq_ao.evaluation import perplexity

    text_path = Path(args.text).expanduser()
    if not text_path.is_file():
        raise CLIError(f"text file {text_path} does not exist.")
    _check_device(args.device)
    dtype = None if args.dtype is None else _torch_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    model = load_quantized(args.dir, device=args.device, dtype=dtype, progress=not args.no_progress, verify=args.verify)
    tok_src = args.tokenizer or args.dir
    refuse_custom_code(Path(tok_src).expanduser())
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CLIError(f"no tokenizer in {tok_src}; pass --tokenizer PATH.") from e
    _log(args, f"loaded {args.dir} in {time.perf_counter() - t0:.1f}s")
    text = _eval_text(text_path, args.text_format)
    ids = tok(text, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        try:
            ppl, n = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows, progress=not args.no_progress)
        except ValueError as e:
            raise CLIError(str(e)) from e
    print(f"windows: {n} x {args.seq_len} tokens ({ids.numel()} tokens in text)")
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``awq-ao info``: describe a checkpoint without loading its weights."""
    from awq_ao.checkpoint import checkpoint_summary

    s = checkpoint_summary(args.dir)
    if args.verify:
        from awq_ao.checkpoint.validate import verify_checkpoint

        v = verify_checkpoint(args.dir)  # raises (exit 1, one line) on any mismatch
        s["verified"] = {"shards": v["shards"], "bytes": v["bytes"], "seconds": round(v["seconds"], 3)}
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    gs = s.get("group_size")
    print(f"path:           {s['path']}")
    print(f"format:         {s['format']}" + (f" (version {s['format_version']})" if s.get("format_version") else ""))
    print(f"architecture:   {s['architecture']}  dtype: {s.get('dtype')}")
    print(f"bits:           {s.get('bits')}")
    print(f"group size:     {gs if gs != -1 else 'per channel'}")
    print(f"zero point:     {'asymmetric' if s.get('zero_point') else 'symmetric'}")
    print(f"quantized:      {s['num_quantized_layers']} layers"
          + (f", {len(s['scaled_input_layers'])} with an input scale (ScaledInputLinear)" if s.get("scaled_input_layers") else ""))
    if s.get("quantized_experts"):
        print(f"MoE experts:    {s['num_quantized_experts']} INT4 expert weights (3-D, one slab per expert)")
    if s.get("float_linears"):
        print(f"full precision: {', '.join(s['float_linears'][:8])}" + (" ..." if len(s["float_linears"]) > 8 else ""))
    if s.get("module_overrides"):
        print(f"overrides:      {len(s['module_overrides'])} layers with their own bits/group size")
    if s.get("bits_per_weight"):
        print(f"footprint:      {s['bits_per_weight']:.2f} bits per quantized weight ({_human(s['quantized_bytes'])} "
              f"for {s['quantized_weights'] / 1e6:.1f} M weights, codes + scales + zeros); "
              f"{_human(s['full_precision_bytes'])} in full precision (embeddings, norms, head, biases)")
    print(f"size on disk:   {_human(s['size_bytes'])} ({s['size_bytes']} bytes; tensors {s['tensor_bytes']} bytes in {len(s['shards'])} shard(s))")
    if s.get("verified"):
        v = s["verified"]
        print(f"verified:       {v['shards']} shard(s), {_human(v['bytes'])}: sha256, headers and "
              f"quantization fields match what was saved ({v['seconds']:.2f}s)")
    if args.layers:
        scaled = set(s.get("scaled_input_layers") or [])
        for n in s["quantized_layers"]:
            print(f"  {n}" + ("  [input_scale]" if n in scaled else ""))
        for n in s.get("quantized_experts") or []:
            print(f"  {n}  [experts]")
    return 0


# ------------------------------------------------------------------------------------------------
# parser / entry point
# ------------------------------------------------------------------------------------------------


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``awq-ao`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    common.add_argument("--quiet", "-q", action="store_true", help="print less")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = argparse.ArgumentParser(
        prog="awq-ao",
        description="AWQ 4-bit weight quantization for PyTorch / torchao: quantize, evaluate, inspect.",
        epilog="Run 'awq-ao COMMAND --help' for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", parents=[common], help="quantize a model with AWQ and save it",
                       description="Quantize a causal LM with AWQ and save it as a checkpoint directory.")
    q.add_argument("model", metavar="MODEL", help="local model dir, dir/file with a .gguf, or a Hub id (with --allow-download)")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory")
    q.add_argument("--bits", type=_bits_type, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=_int_type(1, "an integer >= 1, or -1 for per channel", also=(-1,)), default=128,
                   help="group size along in_features, -1 = per channel (default 128)")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization")
    q.add_argument("--calib", metavar="PATH", help="calibration text: .txt, .jsonl/.json/.parquet/.csv, a folder of them, or a datasets save_to_disk folder (default: shared wiki.valid.tokens)")
    q.add_argument("--text-field", default="text", help="dataset column holding the text (default 'text')")
    q.add_argument("--n-samples", type=_int_type(1, "an integer >= 1"), default=64, help="calibration sequences (default 64)")
    q.add_argument("--seq-len", type=_int_type(1, "an integer >= 1 (tokens)"), default=512, help="calibration sequence length (default 512)")
    q.add_argument("--search-samples", type=_int_type(1, "an integer >= 1"), default=16, help="calibration sequences kept for the scale/clip search (default 16)")
    q.add_argument("--rounding", choices=["nearest", "gptq"], default="gptq",
                   help="codes on the AWQ grid: gptq error feedback (default) or round to nearest (plain AWQ)")
    q.add_argument("--sequential", action="store_true",
                   help="force layer-by-layer convert with the model kept on the CPU (with --device cuda each block visits the GPU). "
                        "Default: layer by layer wherever one stack of repeated blocks holds the linears, with the model on --device")
    q.add_argument("--in-memory", action="store_true",
                   help="search the whole model at once instead of layer by layer")
    q.add_argument("--spill-dir", default=None, metavar="DIR",
                   help="layer-by-layer convert: keep the full-precision originals (for rollback) in a temporary folder here instead of in memory")
    q.add_argument("--batch-size", type=_int_type(1, "an integer >= 1"), default=8, help="calibration batch size (default 8)")
    q.add_argument("--device", default="cpu", help="device for quantization (cpu, cuda, cuda:1, ...)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype: auto (float32 on CPU, float16 on GPU), float32, bfloat16, float16")
    q.add_argument("--format", default="awq_ao", choices=["awq_ao", "autoawq", "compressed-tensors"], help="checkpoint format (default awq_ao)")
    q.add_argument("--fallback", choices=["multiply", "skip"], default=None,
                   help="where AWQ scales cannot be folded: explicit input multiply (awq_ao format only) or skip scaling; default: multiply for awq_ao, skip otherwise")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (only one awq_ao saved, or an empty one)")
    q.add_argument("--max-shard-size", type=_size_type, default="2GB", help="largest safetensors shard (default 2GB)")
    q.add_argument("--save-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the unquantized tensors in the checkpoint (default auto: the model's for "
                        "awq_ao, float16 for autoawq / compressed-tensors)")
    q.add_argument("--gguf-file", default=None, help="which .gguf file to load when MODEL has several")
    q.add_argument("--allow-download", action="store_true", help="allow downloading MODEL from the Hugging Face Hub")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a saved quantized model",
                       description="Perplexity (exp mean NLL over non-overlapping windows) of a saved model in any supported format. The last line is 'perplexity: <value>'.")
    e.add_argument("dir", metavar="DIR", help="checkpoint directory (awq_ao, autoawq or compressed-tensors)")
    e.add_argument("--text", required=True, metavar="FILE", help="evaluation text file")
    e.add_argument("--text-format", choices=["auto", "raw", "wikitext"], default="auto",
                   help="wikitext: rows joined with blank lines as in the AWQ paper (auto: for wiki*.raw files)")
    e.add_argument("--windows", type=_int_type(1, "an integer >= 1"), default=None, metavar="N", help="evaluate at most N windows")
    e.add_argument("--seq-len", type=_int_type(2, "an integer >= 2 (a window predicts its tokens after the first)"), default=2048, metavar="L", help="window length (default 2048)")
    e.add_argument("--device", default="cpu", help="device (default cpu)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint dtype (float32, bfloat16, float16)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory if DIR has none")
    e.add_argument("--verify", action="store_true", help="check every shard's sha256 against the checksums saved with DIR before loading")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", parents=[common], help="describe a checkpoint (no weights loaded)",
                       description="Format, layers, bits, group size and size on disk of a checkpoint.")
    i.add_argument("dir", metavar="DIR", help="checkpoint directory")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true",
                   help="check every shard's sha256, the headers and the quantization fields against what was saved (awq_ao_manifest.json); exit 1 on a mismatch")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``awq-ao`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("awq-ao: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"awq-ao: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
