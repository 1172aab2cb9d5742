"""The ``awq-ao`` command line: quantize a model, evaluate, generate, convert, describe.

::

    awq-ao quantize MODEL --out DIR [--bits 4] [--group-size 128] [--calib PATH|HUB_DATASET] ...
    awq-ao eval DIR --text FILE [--windows N] [--seq-len 2048]
    awq-ao generate DIR --prompt TEXT [--max-new-tokens 64] [--chat] [--sample ...]
    awq-ao convert DIR --format {awq_ao,autoawq,compressed-tensors} --out OUT
    awq-ao info DIR [--layers] [--json] [--verify]

Failures exit with status 1 and a one-line ``awq-ao: error: ...`` on stderr (``--debug``
shows the traceback); bad arguments exit with status 2. Progress and log lines go to stderr;
stdout carries the results (reports, perplexity, generated text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "load_source_model", "load_calibration_text"]

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


def _float_type(lo: float, hi: float | None, accepted: str) -> Any:
    """An argparse ``type=``: a finite number ``> lo`` and ``<= hi`` (``hi`` None: no upper
    bound); the message says what is accepted."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; accepted: {accepted}") from None
        if not (value > lo and (hi is None or value <= hi)) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is out of range; accepted: {accepted}")
        return value

    parse.__name__ = "number"
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


#: calibration.DEFAULT_DATASET, spelled out so that ``--help`` needs no torch import (a test
#: checks that the two agree).
_DEFAULT_DATASET = "Salesforce/wikitext:wikitext-2-raw-v1"


def _read_calibration_rows(source: str, text_field: str, split: str | None) -> list[Any]:
    """:func:`awq_ao.calibration.load_texts` with its errors as one-line :class:`CLIError`."""
    from awq_ao.calibration import CalibrationDataError, load_texts

    try:
        return load_texts(source, text_field, split)
    except CalibrationDataError as e:
        raise CLIError(str(e)) from e


def load_calibration_text(path: str | None, text_field: str = "text", split: str | None = None) -> str:
    """Calibration text of a data source, as one string (rows joined with blank lines).

    A thin wrapper of :func:`awq_ao.calibration.load_texts` (which the CLI itself uses):
    ``path`` is a text file, a ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a folder of such
    files, a ``datasets.save_to_disk`` folder, or a hub dataset name (``name`` or
    ``name:config``; ``split`` picks its split). ``None`` uses the default: WikiText-2
    validation from the hub (through the ``datasets`` cache). Chat rows (``messages``
    lists) give their turns' contents.

    Raises:
        CLIError: the data cannot be read (one line saying why).
    """
    rows = _read_calibration_rows(path if path is not None else _DEFAULT_DATASET, text_field, split)
    texts = []
    for r in rows:
        if isinstance(r, list):
            r = "\n\n".join(str(m.get("content", "")) for m in r if isinstance(m, dict))
        texts.append(str(r))
    return "\n\n".join(texts)


def _has_chat_template(tok: Any) -> bool:
    return getattr(tok, "chat_template", None) is not None


def _precheck_chat_template(spec: str) -> None:
    """``--chat-template`` on a local model folder whose tokenizer files carry no chat
    template: fail before the model load (other sources are checked once loaded)."""
    p = Path(spec).expanduser()
    cfg = p / "tokenizer_config.json"
    if not p.is_dir() or not cfg.is_file() or any(p.glob("*.gguf")):
        return
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return
    try:
        has = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") is not None
    except (OSError, ValueError, AttributeError):
        return
    if not has:
        raise CLIError(f"--chat-template: the tokenizer in {p} has no chat template; drop --chat-template.")


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


def _linear_shapes(model: Any) -> list[tuple[str, int, int]]:
    """``(name, out_features, in_features)`` of every linear the CLI's quantize will quantize
    (the model's quantizable linears but the head and linears tied to the embedding)."""
    from awq_ao.lowering.swap import is_quantizable_linear

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = []
    for name, mod in model.named_modules():
        if not is_quantizable_linear(mod) or name.endswith("lm_head"):
            continue
        if emb is not None and getattr(mod, "weight", None) is getattr(emb, "weight", 0):
            continue
        if hasattr(mod, "in_features"):
            k, n = mod.in_features, mod.out_features
        else:  # transformers Conv1D: weight [in, out]
            k, n = mod.weight.shape[0], mod.weight.shape[1]
        out.append((name, int(n), int(k)))
    return out


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
    bad = [f"{name} (in_features={k})" for name, _, k in _linear_shapes(model) if k % group_size]
    if bad:
        raise CLIError(
            f"--format {fmt} needs in_features divisible by --group-size {group_size}; not so for "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Use --format awq_ao (ragged groups are fine) "
            "or another group size."
        )


def _warn(msg: str) -> None:
    """A warning line on stderr (shown even with --quiet: the CLI silences Python warnings)."""
    print(f"awq-ao: warning: {msg}", file=sys.stderr)


def _marlin_warning(layers: list[tuple[str, int, int, int, int]], fmt: str) -> None:
    """Warn which layers vLLM's Marlin kernels will refuse (autoawq / compressed-tensors)."""
    if fmt == "awq_ao":
        return
    from awq_ao.checkpoint.vllm_compat import describe_issues, marlin_issues

    issues = marlin_issues(layers)
    if issues:
        _warn(describe_issues(issues, fmt))


class _Phases:
    """One stderr line per finished phase with its time, and the total at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self) -> float:
        """Seconds since the last lap or finished phase (and restart that clock)."""
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt

    def done(self, phase: str, detail: str = "", extra: float = 0.0) -> None:
        """Log ``phase`` as finished: the time since the last lap, plus ``extra`` seconds
        spent on it earlier."""
        dt = self.lap() + extra
        self.times[phase] = self.times.get(phase, 0.0) + dt
        _log(self.args, f"{phase}: {detail + ', ' if detail else ''}{dt:.1f}s")

    def total(self) -> float:
        t = time.perf_counter() - self.start
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items())
        _log(self.args, f"total: {t:.1f}s ({parts})")
        return t


def _library_progress(args: argparse.Namespace) -> None:
    """``--no-progress`` also turns off transformers' own bars (e.g. "Loading weights")."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _resolve_dir(spec: str) -> Path:
    """A checkpoint folder, or a hub id through the Hugging Face cache (one-line errors)."""
    from awq_ao.checkpoint.hub import resolve_checkpoint

    return resolve_checkpoint(spec)


def _is_quantized_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError:
        return False


def _load_tokenizer(src: str | Path, flag: str = "--tokenizer") -> Any:
    """The tokenizer of a local folder (never running shipped code)."""
    from transformers import AutoTokenizer

    from awq_ao.checkpoint.formats import refuse_custom_code

    p = Path(src).expanduser()
    if p.is_dir():
        refuse_custom_code(p)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CLIError(f"no tokenizer in {src}; pass {flag} PATH.") from e


#: tokenizer files ``convert`` copies as they are
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                    "chat_template.jinja", "chat_template.json")


class _TokenizerFiles:
    """Stands in for a tokenizer in ``save_quantized``: copies a folder's tokenizer files
    byte for byte (inside the save's atomic temporary folder)."""

    def __init__(self, src: Path) -> None:
        self.name_or_path = str(src)
        self.files = [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]

    def save_pretrained(self, out: str | os.PathLike) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(out) / f.name)


# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    """``awq-ao quantize``."""
    import torch

    import awq_ao
    from awq_ao.calibration import CalibrationDataError, token_blocks
    from awq_ao.checkpoint import save_quantized
    from awq_ao.checkpoint.atomic_dir import check_output_dir
    from awq_ao.progress import CostModel, run_progress

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
    calib = args.calib if args.calib is not None else _DEFAULT_DATASET
    calib_is_path = Path(calib).expanduser().exists()
    if args.calib_split is not None and calib_is_path:
        raise CLIError(f"--calib-split picks the split of a hub dataset; {calib} is a local path (drop --calib-split).")
    _check_device(args.device)
    source = Path(args.model).expanduser()
    source = source.parent if source.is_file() else source
    check_output_dir(args.out, args.overwrite, [source] if source.is_dir() else [])
    if args.chat_template:
        _precheck_chat_template(args.model)
    dtype = _torch_dtype(args.dtype, args.device)
    phases = _Phases(args)
    _log(args, f"reading calibration data {calib} ...")
    rows = _read_calibration_rows(calib, args.text_field, args.calib_split)  # fails fast on bad data
    read_s = phases.lap()  # part of the "calibration data" phase, logged once tokenized

    _log(args, f"loading {args.model} ({str(dtype).removeprefix('torch.')}) ...")
    _library_progress(args)
    model, tok = load_source_model(args.model, dtype, args.allow_download, args.gguf_file)
    # layer-by-layer: the model stays on the CPU and each block visits the device in turn
    home = "cpu" if args.sequential else args.device
    model.to(home)
    phases.done("loading", f"{type(model).__name__} on {home}")
    _precheck_format(model, args.format, args.bits, args.group_size)
    if args.chat_template and not _has_chat_template(tok):
        raise CLIError(f"--chat-template: the tokenizer of {args.model} has no chat template; drop --chat-template.")

    phases.lap()
    try:
        blocks = token_blocks(tok, rows, args.n_samples, args.seq_len, chat_template=args.chat_template)
    except CalibrationDataError as e:
        raise CLIError(str(e)) from e
    label = Path(calib).name if calib_is_path else calib + (f" (split {args.calib_split})" if args.calib_split else "")
    phases.done("calibration data", f"{blocks.shape[0]} x {blocks.shape[1]} tokens from {label}"
                + (" through the chat template" if args.chat_template else ""), extra=read_s)
    _marlin_warning([(n, o, k, args.bits, args.group_size) for n, o, k in _linear_shapes(model)], args.format)

    fallback = args.fallback or ("multiply" if args.format == "awq_ao" else "skip")
    batches = [blocks[i : i + args.batch_size].to(home) for i in range(0, blocks.shape[0], args.batch_size)]
    if args.sequential:
        layerwise = dict(sequential=True, device=None if args.device == "cpu" else args.device, spill_dir=args.spill_dir)
    elif args.in_memory:
        layerwise = dict(sequential=False)
    else:  # automatic: layer by layer where one block stack holds the linears, blocks stay where the model is
        layerwise = dict(spill_dir=args.spill_dir)
    with run_progress(not args.no_progress) as (run, _owned):  # one bar: calibration .. saving
        run.plan("save", sum(CostModel(None).save(o, k) for _, o, k in _linear_shapes(model)))
        with torch.no_grad():
            report = awq_ao.quantize(
                model,
                batches,
                bits=args.bits,
                group_size=args.group_size,
                zero_point=not args.no_zero_point,
                fallback=fallback,
                max_search_samples=args.search_samples,
                rounding=args.rounding,
                **{k: v for k, v in (("search_loss", args.search_loss), ("gptq_act_order", args.act_order)) if v is not None},
                progress=not args.no_progress,
                verbose=False,
                **layerwise,
            )
        phases.done("quantization", f"{len(report.quantized)} linears quantized")
        if not args.quiet:
            run.write(report.summary(), sys.stdout)
        card = {
            "calibration": label,
            "calibration samples": f"{args.n_samples} x {args.seq_len} tokens",
            "chat template": "yes" if args.chat_template else "no",
        }
        out = save_quantized(
            model, args.out, tokenizer=tok, format=args.format, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, progress=not args.no_progress, dtype=args.save_dtype,
            model_card=card,
        )
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        phases.done("saving", f"{args.format}, {_human(size)}")
    print(f"saved {args.format} checkpoint to {out} ({_human(size)}) in {time.perf_counter() - phases.start:.1f}s")
    phases.total()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``awq-ao eval``: perplexity of a saved quantized model, or of an unquantized one (the
    full-precision baseline)."""
    import torch

    from awq_ao.checkpoint import load_quantized
    from awq_ao.evaluation import leading_bos, perplexity, text_ids

    text_path = Path(args.text).expanduser()
    if not text_path.is_file():
        raise CLIError(f"text file {text_path} does not exist.")
    _check_device(args.device)
    t0 = time.perf_counter()
    p = Path(args.dir).expanduser()
    if not p.exists():
        p = _resolve_dir(args.dir)  # a hub id, through the Hugging Face cache
    if p.is_dir() and _is_quantized_dir(p):
        dtype = None if args.dtype is None else _torch_dtype(args.dtype, args.device)
        tok = _load_tokenizer(args.tokenizer or p)
        model = load_quantized(p, device=args.device, dtype=dtype, progress=not args.no_progress, verify=args.verify)
        kind = None
    else:  # no quantization_config: the full-precision baseline
        if args.verify:
            raise CLIError(f"--verify checks a quantized checkpoint's checksums; {args.dir} is not quantized.")
        dtype = _torch_dtype(args.dtype or "auto", args.device)
        _library_progress(args)
        has_weights = p.is_dir() and any(any(p.glob(g)) for g in ("*.safetensors", "*.bin", "*.gguf"))
        # a hub id whose cached snapshot holds other weight files: let transformers resolve it
        source = str(p) if has_weights or Path(args.dir).expanduser().exists() else args.dir
        model, tok = load_source_model(source, dtype)
        model.to(args.device)
        if args.tokenizer:
            tok = _load_tokenizer(args.tokenizer)
        kind = f"model: unquantized ({str(dtype).removeprefix('torch.')}, full precision): baseline perplexity"
    _log(args, f"loaded {args.dir} in {time.perf_counter() - t0:.1f}s")
    text = _eval_text(text_path, args.text_format)
    bos = leading_bos(tok)  # Gemma/Llama: every window starts with <bos>, as the benchmarks' do
    ids = text_ids(tok, text, bos)
    with torch.no_grad():
        try:
            ppl, n = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows,
                                progress=not args.no_progress, bos_token_id=bos)
        except ValueError as e:
            raise CLIError(str(e)) from e
    if kind:
        print(kind)
    print(f"windows: {n} x {args.seq_len} tokens ({ids.numel()} tokens in text)")
    print(f"perplexity: {ppl:.4f}")
    return 0


def _generate_once(model: Any, tok: Any, enc: Any, args: argparse.Namespace) -> str:
    """The new text ``model.generate`` writes after the encoded prompt."""
    import torch

    ids = enc["input_ids"].to(model.device)
    mask = enc.get("attention_mask")
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if mask is not None:
        kwargs["attention_mask"] = mask.to(model.device)
    if args.sample:
        if args.temperature is not None:
            kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
        if args.seed is not None:
            torch.manual_seed(args.seed)
    else:  # greedy: no sampling settings from generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if tok.pad_token_id is not None:
        kwargs["pad_token_id"] = tok.pad_token_id
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def cmd_generate(args: argparse.Namespace) -> int:
    """``awq-ao generate``: text from a quantized checkpoint (one prompt, or a chat on stdin)."""
    from awq_ao.checkpoint import load_quantized

    if args.prompt is None and not args.chat:
        raise CLIError("pass --prompt TEXT, or --chat for an interactive chat reading lines from stdin.")
    if not args.sample:
        given = [f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} need --sample (the default is greedy decoding).")
    _check_device(args.device)
    dtype = None if args.dtype is None else _torch_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    path = _resolve_dir(args.dir)
    if not _is_quantized_dir(path):
        raise CLIError(f"{args.dir} has no quantization_config; awq-ao generate runs quantized checkpoints.")
    tok = _load_tokenizer(args.tokenizer or path)
    if args.chat and not _has_chat_template(tok):
        raise CLIError(f"--chat: the tokenizer of {args.tokenizer or args.dir} has no chat template; drop --chat.")
    model = load_quantized(path, device=args.device, dtype=dtype, progress=not args.no_progress)
    _log(args, f"loaded {args.dir} in {time.perf_counter() - t0:.1f}s")

    def chat_turn(messages: list[dict[str, str]]) -> str:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return _generate_once(model, tok, enc, args)

    if not args.chat:
        print(_generate_once(model, tok, tok(args.prompt, return_tensors="pt"), args), flush=True)
        return 0
    if args.prompt is not None:
        print(chat_turn([{"role": "user", "content": args.prompt}]), flush=True)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _log(args, "chat: type a message and press Enter; Ctrl-D ends")
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = chat_turn(messages)
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``awq-ao convert``: re-save a quantized checkpoint in another format (no re-quantizing)."""
    from awq_ao.checkpoint import checkpoint_summary, load_quantized, save_quantized
    from awq_ao.checkpoint.atomic_dir import check_output_dir
    from awq_ao.checkpoint.formats import find_quantized_layers

    phases = _Phases(args)
    src = _resolve_dir(args.dir)
    if not _is_quantized_dir(src):
        raise CLIError(f"{args.dir} has no quantization_config; quantize it with awq-ao quantize.")
    src_fmt = checkpoint_summary(src)["format"]
    check_output_dir(args.out, args.overwrite, [src])
    tok = _TokenizerFiles(src)
    if not tok.files:
        _log(args, f"note: {args.dir} has no tokenizer files; the converted checkpoint has none either")
    _log(args, f"loading {args.dir} ({src_fmt}) ...")
    model = load_quantized(src, device="cpu", progress=not args.no_progress)
    phases.done("loading", f"{src_fmt}, {len(find_quantized_layers(model))} quantized layers")
    layers = find_quantized_layers(model)
    _marlin_warning([(n, q.out_features, q.in_features, q.weight.bits, q.weight.group_size) for n, q in layers.items()],
                    args.format)
    out = save_quantized(
        model, args.out, tokenizer=tok if tok.files else None, format=args.format, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, progress=not args.no_progress, dtype=args.save_dtype,
        model_card={"converted from": f"{src.name} ({src_fmt} format)"},
    )
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    phases.done("saving", f"{args.format}, {_human(size)}")
    print(f"converted {src_fmt} -> {args.format}: saved to {out} ({_human(size)})")
    phases.total()
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
        from awq_ao.progress import write

        write(msg)  # above a running bar, not through it


def build_parser() -> argparse.ArgumentParser:
    """The ``awq-ao`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    common.add_argument("--quiet", "-q", action="store_true", help="print less")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = argparse.ArgumentParser(
        prog="awq-ao",
        description="AWQ 4-bit weight quantization for PyTorch / torchao: quantize, evaluate, generate, convert, inspect.",
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
    q.add_argument("--calib", metavar="PATH|DATASET",
                   help="calibration data: a text file, .jsonl/.json/.parquet/.csv, a folder of them, a datasets "
                        "save_to_disk folder, or a hub dataset name ('name' or 'name:config', through the datasets "
                        "cache). Default: the hub dataset "
                        f"{_DEFAULT_DATASET} (validation split; offline, pass a local file)")
    q.add_argument("--calib-split", default=None, metavar="SPLIT",
                   help="split of a hub --calib dataset (default: train; validation for the default dataset)")
    q.add_argument("--text-field", default="text", help="dataset column holding the text (default 'text'; a 'messages' column of chat turns is used when there is none)")
    q.add_argument("--chat-template", action="store_true",
                   help="put each calibration row through the tokenizer's chat template (instruct models)")
    q.add_argument("--n-samples", type=_int_type(1, "an integer >= 1"), default=64, help="calibration sequences (default 64)")
    q.add_argument("--seq-len", type=_int_type(1, "an integer >= 1 (tokens)"), default=512, help="calibration sequence length (default 512)")
    q.add_argument("--search-samples", type=_int_type(1, "an integer >= 1"), default=16, help="calibration sequences kept for the scale/clip search (default 16)")
    q.add_argument("--rounding", choices=["nearest", "gptq"], default="gptq",
                   help="codes on the AWQ grid: gptq error feedback (default) or round to nearest (plain AWQ)")
    q.add_argument("--search-loss", choices=["module", "linear", "attention"], default=None,
                   help="what candidate scales are scored on (default: the library's; see docs/options.md)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq rounding: columns in order of decreasing input energy (default: the library's)")
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

    e = sub.add_parser("eval", parents=[common], help="perplexity of a saved model (quantized, or the full-precision baseline)",
                       description="Perplexity (exp mean NLL over non-overlapping windows) of a saved model in any supported format. The last line is 'perplexity: <value>'.")
    e.add_argument("dir", metavar="DIR", help="checkpoint directory (awq_ao, autoawq or compressed-tensors) or hub id; "
                   "a model without quantization_config (folder, .gguf, cached hub id) is evaluated in full precision as the baseline")
    e.add_argument("--text", required=True, metavar="FILE", help="evaluation text file")
    e.add_argument("--text-format", choices=["auto", "raw", "wikitext"], default="auto",
                   help="wikitext: rows joined with blank lines as in the AWQ paper (auto: for wiki*.raw files)")
    e.add_argument("--windows", type=_int_type(1, "an integer >= 1"), default=None, metavar="N", help="evaluate at most N windows")
    e.add_argument("--seq-len", type=_int_type(2, "an integer >= 2 (a window predicts its tokens after the first)"), default=2048, metavar="L", help="window length (default 2048)")
    e.add_argument("--device", default="cpu", help="device (default cpu)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint dtype (float32, bfloat16, float16; unquantized default: float32 on CPU, float16 on GPU)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory if DIR has none")
    e.add_argument("--verify", action="store_true", help="check every shard's sha256 against the checksums saved with DIR before loading")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="generate text with a quantized checkpoint (or chat)",
                       description="Generate text with a quantized checkpoint. Only the new text goes to stdout; "
                                   "log lines go to stderr. With --chat and no --prompt: an interactive chat that "
                                   "reads one message per line from stdin until EOF, keeping the conversation.")
    g.add_argument("dir", metavar="DIR", help="checkpoint directory or hub id (through the Hugging Face cache)")
    g.add_argument("--prompt", default=None, metavar="TEXT", help="the prompt (with --chat: the user message)")
    g.add_argument("--max-new-tokens", type=_int_type(1, "an integer >= 1"), default=64, metavar="N", help="tokens to generate (default 64)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template; without --prompt, chat on stdin")
    g.add_argument("--device", default="cpu", help="device (default cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint dtype")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory if DIR has none")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (the default)")
    g.add_argument("--temperature", type=_float_type(0.0, None, "a number > 0"), default=None, metavar="T", help="sampling temperature (with --sample)")
    g.add_argument("--top-p", type=_float_type(0.0, 1.0, "a number in (0, 1]"), default=None, metavar="P", help="nucleus sampling threshold (with --sample)")
    g.add_argument("--seed", type=_int_type(0, "an integer >= 0"), default=None, metavar="S", help="random seed (with --sample)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", parents=[common], help="re-save a quantized checkpoint in another format",
                       description="Re-save a quantized checkpoint in another format without re-quantizing: the "
                                   "codes, scales and zeros are carried over; tokenizer files are copied as they are.")
    c.add_argument("dir", metavar="DIR", help="quantized checkpoint directory or hub id")
    c.add_argument("--format", required=True, choices=["awq_ao", "autoawq", "compressed-tensors"], help="target format")
    c.add_argument("--out", required=True, metavar="OUT", help="output directory")
    c.add_argument("--save-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the unquantized tensors (default auto: as loaded for awq_ao, float16 for autoawq / compressed-tensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory (only one awq_ao saved, or an empty one)")
    c.add_argument("--max-shard-size", type=_size_type, default="2GB", help="largest safetensors shard (default 2GB)")
    c.set_defaults(func=cmd_convert)

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
