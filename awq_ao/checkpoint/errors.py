"""The two exceptions of the checkpoint code: a bad checkpoint folder and a failed write."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointWriteError"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, damaged, or does not match its configuration."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, no permission, an I/O error, or an error raised by
    safetensors while writing a shard).

    ``errno`` is the cause's error number where one is known (``ENOSPC`` for a full disk,
    ``EIO`` otherwise); the message names the target folder and the cause. Nothing is left
    half-written: the target folder is exactly as it was before the save.
    """
