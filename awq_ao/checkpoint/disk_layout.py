"""Names and shapes on disk: format names and versions, file names, the awq_ao format's tensor
keys and code shapes, and the marker file every awq_ao save writes."""

from __future__ import annotations

__all__ = [
    "FORMATS",
    "FORMAT_AWQ_AO",
    "FORMAT_AUTOAWQ",
    "FORMAT_COMPRESSED_TENSORS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_SAME_NAME",
    "quantized_keys",
    "codes_shape",
    "CONFIG_NAME",
    "SINGLE_FILE",
    "INDEX_FILE",
    "MARKER_NAME",
    "MARKER_VERSION",
]

FORMAT_AWQ_AO = "awq_ao"
FORMAT_AUTOAWQ = "autoawq"
FORMAT_COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (FORMAT_AWQ_AO, FORMAT_AUTOAWQ, FORMAT_COMPRESSED_TENSORS)

#: Version of the awq_ao on-disk format this code writes, and the newest it reads.
FORMAT_VERSION = 3
#: First version whose codes carry the float parameter's own name (``m.weight``).
FORMAT_VERSION_SAME_NAME = 3


def quantized_keys(param: str, version: int = FORMAT_VERSION) -> tuple[str, str, str]:
    """The file keys ``(codes, scale, zero)`` of quantized parameter ``param`` (``m.weight`` of
    a linear, ``m.gate_up_proj`` of an experts module) in awq_ao format ``version``."""
    codes = param if version >= FORMAT_VERSION_SAME_NAME else f"{param}_packed"
    return codes, f"{param}_scale", f"{param}_zero"


def codes_shape(lead: tuple[int, ...], n: int, k: int, bits: int, version: int = FORMAT_VERSION) -> tuple[int, ...]:
    """On-disk shape of the codes of an ``[*lead, n, k]`` weight in awq_ao format ``version``:
    nibbles ``[*lead, n, ceil(k/2)]`` for bits <= 4, else one byte per code (``[*lead, n, k, 1]``
    since version 3, so the shape never equals the float weight's)."""
    if bits <= 4:
        return (*lead, n, (k + 1) // 2)
    return (*lead, n, k, 1) if version >= FORMAT_VERSION_SAME_NAME else (*lead, n, k)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: The file awq_ao writes into every folder it saves (a small JSON: writer, format, version).
#: ``overwrite=True`` only ever replaces a folder that carries it (or an empty one).
MARKER_NAME = ".awq_ao-checkpoint"
#: Version of the marker file's JSON.
MARKER_VERSION = 1
