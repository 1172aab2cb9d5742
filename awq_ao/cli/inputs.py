"""What the ``awq-ao`` subcommands read: argument types, models, tokenizers, calibration text."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------
# helpers (importable for scripts and tests)
# ------------------------------------------------------------------------------------------------


def int_type(lo: int, accepted: str, also: tuple[int, ...] = ()) -> Any:
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


def float_type(lo: float, hi: float | None, accepted: str) -> Any:
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


def bits_type(text: str) -> int:
    """argparse ``type=`` for ``--bits``."""
    from awq_ao.lowering.quant_math import SUPPORTED_BITS

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: an integer in {', '.join(map(str, SUPPORTED_BITS))}")
    return value


def size_type(text: str) -> int:
    """argparse ``type=`` for ``--max-shard-size`` (checked when parsing, before any work)."""
    from awq_ao.checkpoint.save import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; accepted: a positive number of bytes or e.g. 2GB, 500MB, 64KiB"
        ) from None


def check_device(device: str) -> None:
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


def torch_dtype(name: str, device: str) -> Any:
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
DEFAULT_DATASET = "Salesforce/wikitext:wikitext-2-raw-v1"


def read_calibration_rows(source: str, text_field: str, split: str | None) -> list[Any]:
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
    rows = read_calibration_rows(path if path is not None else DEFAULT_DATASET, text_field, split)
    texts = []
    for r in rows:
        if isinstance(r, list):
            r = "\n\n".join(str(m.get("content", "")) for m in r if isinstance(m, dict))
        texts.append(str(r))
    return "\n\n".join(texts)


def has_chat_template(tok: Any) -> bool:
    return getattr(tok, "chat_template", None) is not None


def precheck_chat_template(spec: str) -> None:
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


def eval_text(path: Path, mode: str) -> str:
    from awq_ao.evaluation import wikitext_test_text

    if mode == "wikitext" or (mode == "auto" and path.suffix == ".raw" and "wiki" in path.name):
        return wikitext_test_text(path)
    return path.read_text(encoding="utf-8", errors="replace")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def linear_shapes(model: Any) -> list[tuple[str, int, int]]:
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


def precheck_format(model: Any, fmt: str, bits: int, group_size: int) -> None:
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
    bad = [f"{name} (in_features={k})" for name, _, k in linear_shapes(model) if k % group_size]
    if bad:
        raise CLIError(
            f"--format {fmt} needs in_features divisible by --group-size {group_size}; not so for "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Use --format awq_ao (ragged groups are fine) "
            "or another group size."
        )


def _warn(msg: str) -> None:
    """A warning line on stderr (shown even with --quiet: the CLI silences Python warnings)."""
    print(f"awq-ao: warning: {msg}", file=sys.stderr)


def marlin_warning(layers: list[tuple[str, int, int, int, int]], fmt: str) -> None:
    """Warn which layers vLLM's Marlin kernels will refuse (autoawq / compressed-tensors)."""
    if fmt == "awq_ao":
        return
    from awq_ao.checkpoint.vllm_compat import describe_issues, marlin_issues

    issues = marlin_issues(layers)
    if issues:
        _warn(describe_issues(issues, fmt))


class Phases:
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
        log_line(self.args, f"{phase}: {detail + ', ' if detail else ''}{dt:.1f}s")

    def total(self) -> float:
        t = time.perf_counter() - self.start
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items())
        log_line(self.args, f"total: {t:.1f}s ({parts})")
        return t


def library_progress(args: argparse.Namespace) -> None:
    """``--no-progress`` also turns off transformers' own bars (e.g. "Loading weights")."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def resolve_dir(spec: str) -> Path:
    """A checkpoint folder, or a hub id through the Hugging Face cache (one-line errors)."""
    from awq_ao.checkpoint.hub import resolve_checkpoint

    return resolve_checkpoint(spec)


def is_quantized_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_tokenizer(src: str | Path, flag: str = "--tokenizer") -> Any:
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


class TokenizerFiles:
    """Stands in for a tokenizer in ``save_quantized``: copies a folder's tokenizer files
    byte for byte (inside the save's atomic temporary folder)."""

    def __init__(self, src: Path) -> None:
        self.name_or_path = str(src)
        self.files = [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]

    def save_pretrained(self, out: str | os.PathLike) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(out) / f.name)



def log_line(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        from awq_ao.progress import write

        write(msg)  # above a running bar, not through it
