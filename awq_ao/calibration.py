"""Calibration data: texts from files, local or hub datasets, cut into token blocks.

``calibration_batches(tokenizer, dataset)`` is what :func:`awq_ao.quantize` and the CLI use
when they are given a tokenizer and a data source instead of ready batches::

    batches = calibration_batches(tok, "notes.txt", n_samples=64, seq_len=512)
    batches = calibration_batches(tok, "Salesforce/wikitext:wikitext-2-raw-v1", split="validation")
    batches = calibration_batches(tok, ["some text", "more text"], chat_template=True)

A data source is one of: a list of strings; a ``datasets.Dataset``; a path to a text file
(``.txt``, ``.tokens``, ...), a ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a folder of
such files or a ``datasets.save_to_disk`` folder; or a Hugging Face hub dataset name
(``name`` or ``name:config``, read through the ``datasets`` cache; offline, a name that is
not cached is a one-line :class:`CalibrationDataError`).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_DATASET",
    "CalibrationDataError",
    "load_texts",
    "token_blocks",
    "calibration_batches",
]

#: The data source used when none is given (WikiText-2's validation split, from the hub).
DEFAULT_DATASET = "Salesforce/wikitext:wikitext-2-raw-v1"
_DEFAULT_SPLIT = "validation"

_BUILDERS = {".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text", ".md": "text",
             ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


#: ``name``, ``owner/name``, optionally ``:config``
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


class CalibrationDataError(ValueError):
    """Calibration data that cannot be read or is too short; the message says what to do."""


def _rows(ds: Any, field: str, where: str) -> list[Any]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    cols = list(ds.column_names)
    if field in cols:
        return [r for r in ds[field] if r]
    if "messages" in cols:
        return [r for r in ds["messages"] if r]
    raise CalibrationDataError(f"{where}: no column {field!r} (columns: {', '.join(cols)}); name the text column (text_field / --text-field).")


def _from_path(p: Path, field: str) -> list[Any]:
    import datasets

    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _rows(datasets.load_from_disk(str(p)), field, str(p))
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS)
        if not files:
            raise CalibrationDataError(f"{p}: no .txt/.json/.jsonl/.parquet/.csv files in the folder.")
        kinds = {_BUILDERS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise CalibrationDataError(f"{p}: mixes file types ({', '.join(sorted(kinds))}); keep one kind per folder.")
        kind = kinds.pop()
        if kind == "text":
            return [f.read_text(encoding="utf-8", errors="replace") for f in files]
        data_files = [str(f) for f in files]
    else:
        kind = _BUILDERS.get(p.suffix.lower(), "text")
        if kind == "text":
            return [p.read_text(encoding="utf-8", errors="replace")]
        data_files = [str(p)]
    with tempfile.TemporaryDirectory(prefix="awq_ao_ds_") as cache:
        return _rows(datasets.load_dataset(kind, data_files=data_files, split="train", cache_dir=cache), field, str(p))


def _from_hub(name: str, split: str | None, field: str) -> list[Any]:
    import datasets

    repo, _, config = name.partition(":")
    split = split or (_DEFAULT_SPLIT if name == DEFAULT_DATASET else "train")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # offline, unknown name, unknown split: datasets raises many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "it is not in the local datasets cache and the hub is offline" if offline else first
        raise CalibrationDataError(
            f"calibration dataset {name!r} (split {split!r}) could not be loaded: {hint}. "
            "Pass a local text file or folder instead, or a dataset name that is cached."
        ) from e
    return _rows(ds, field, name)


def load_texts(source: Any = None, text_field: str = "text", split: str | None = None) -> list[Any]:
    """The rows of a calibration data source (strings, or chat ``messages`` lists).

    Args:
        source: see the module docstring; ``None`` means :data:`DEFAULT_DATASET`.
        text_field: the column holding the text in tabular sources (a ``messages`` column of
            chat turns is used when there is no such column).
        split: the split of a hub dataset (default ``"train"``; ``"validation"`` for the
            default dataset).

    Raises:
        CalibrationDataError: a missing file, an unknown column, an unloadable dataset.
    """
    if source is None:
        source = DEFAULT_DATASET
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.exists():
            return _from_path(p, text_field)
        name = str(source)
        if not _HUB_NAME.match(name) or Path(name).suffix.lower() in _BUILDERS:
            raise CalibrationDataError(f"calibration data {p} does not exist (and is not a hub dataset name).")
        return _from_hub(name, split, text_field)
    try:
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            return _rows(source, text_field, "dataset")
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, Sequence) and all(isinstance(r, (str, list)) for r in source):
        return [r for r in source if r]
    raise CalibrationDataError(
        f"calibration data of type {type(source).__name__}: pass a list of strings, a datasets.Dataset, "
        "a file or folder path, or a hub dataset name."
    )


def _as_text(row: Any, tokenizer: Any, chat_template: bool) -> str:
    if not chat_template:
        if isinstance(row, list):  # chat turns without a template: their contents, in order
            return "\n\n".join(str(m.get("content", "")) for m in row if isinstance(m, dict))
        return str(row)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationDataError("chat_template=True, but the tokenizer has no chat template.")
    messages = row if isinstance(row, list) else [{"role": "user", "content": str(row)}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def token_blocks(
    tokenizer: Any, rows: Sequence[Any], n_samples: int = 64, seq_len: int = 512, chat_template: bool = False
) -> torch.Tensor:
    """``[n_samples, seq_len]`` consecutive, non-overlapping token blocks of the rows joined
    by blank lines (each row put through the tokenizer's chat template if ``chat_template``).

    Where the tokenizer puts a BOS in front of a text by itself (Gemma, Llama:
    :func:`awq_ao.evaluation.leading_bos`), every block is that BOS followed by ``seq_len - 1``
    text tokens, as the model sees a sequence at inference (Gemma without its ``<bos>`` is far
    off its trained distribution); with a chat template the template's own tokens are kept as
    they are. Deterministic; reads only as much text as it needs.

    Raises:
        CalibrationDataError: the rows give fewer than ``n_samples * seq_len`` tokens.
    """
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CalibrationDataError(f"{name} must be an integer >= 1, got {v!r}.")
    from awq_ao.evaluation import leading_bos

    bos = None if chat_template else leading_bos(tokenizer)
    per_block = seq_len - 1 if bos is not None else seq_len
    need = n_samples * per_block
    ids: list[int] = []
    pending: list[str] = []
    chars = 0
    budget = need * 8  # characters to tokenize at a time (~4 per token for English)
    for row in rows:
        text = _as_text(row, tokenizer, chat_template)
        pending.append(text)
        chars += len(text)
        if chars >= budget:
            ids += tokenizer("\n\n".join(pending), add_special_tokens=False, verbose=False)["input_ids"]
            pending, chars = [], 0
            if len(ids) >= need:
                break
    if pending and len(ids) < need:
        ids += tokenizer("\n\n".join(pending), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < need:
        raise CalibrationDataError(
            f"the calibration data gives {len(ids)} tokens; {n_samples} x {per_block} = {need} are needed. "
            "Use more text or fewer / shorter samples."
        )
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(n_samples, per_block)
    if bos is not None:
        blocks = torch.cat([blocks.new_full((n_samples, 1), bos), blocks], dim=1)
    return blocks


def calibration_batches(
    tokenizer: Any,
    dataset: Any = None,
    n_samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
    chat_template: bool = False,
    text_field: str = "text",
    split: str | None = None,
) -> list[torch.Tensor]:
    """Calibration batches (``[batch_size, seq_len]`` token tensors) for :func:`awq_ao.quantize`.

    Args:
        tokenizer: the model's tokenizer.
        dataset: a data source (see the module docstring); ``None``: :data:`DEFAULT_DATASET`.
        n_samples: number of ``seq_len``-token sequences.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        chat_template: put each row through the tokenizer's chat template (instruct models);
            plain text rows become one user message.
        text_field: text column of tabular data.
        split: split of a hub dataset.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CalibrationDataError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    blocks = token_blocks(tokenizer, load_texts(dataset, text_field, split), n_samples, seq_len, chat_template)
    return [blocks[i : i + batch_size] for i in range(0, n_samples, batch_size)]
