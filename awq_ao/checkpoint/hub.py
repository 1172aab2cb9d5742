"""Checkpoints named by Hugging Face hub id: resolved through the local hub cache.

``load_quantized("org/model-awq")`` works like ``from_pretrained``: a local folder wins; an
id that is not a folder is fetched with ``huggingface_hub.snapshot_download`` (only data
files: configs, safetensors shards, tokenizer files, the model card; never Python code),
which reuses the cache and works offline for ids already cached.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from awq_ao.checkpoint.formats import CheckpointError

__all__ = ["resolve_checkpoint", "looks_like_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

#: What a checkpoint needs; ``*.py`` is never fetched.
ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "README.md", ".awq_ao-checkpoint",
]


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with hub-legal characters (and not an existing path)."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a checkpoint given as a path or as a hub id.

    Raises:
        CheckpointError: neither an existing folder nor a hub id that can be fetched or is
            cached (the message says which, and what to do offline).
    """
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; a checkpoint is a folder (config.json and safetensors shards).")
        return p
    name = str(path_or_id)
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{p}: no such directory (and not a hub id of the form owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated: huggingface_hub raises several types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{name}: not a local folder, and the hub id could not be fetched or found in the Hugging "
            f"Face cache ({type(e).__name__}: {first[:200]}). Download it once online, or pass a local folder."
        ) from e
