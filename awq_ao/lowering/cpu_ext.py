"""Build and load awq_ao's C++ CPU kernels (``csrc/int4_cpu.cpp``, ``csrc/int8_cpu.cpp``,
``csrc/ef_round_cpu.cpp``; AVX2 + FMA).

The kernels are compiled once per machine with :func:`torch.utils.cpp_extension.load` (a C++
compiler and ``ninja`` are needed; the build takes about 20 s on two cores and is cached
under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, in a folder named
after a hash of the source and flags). They register the ops
``torch.ops.awq_ao_cpu.int4_gemm``, ``torch.ops.awq_ao_cpu.int4_dequant_t``,
``torch.ops.awq_ao_cpu.int8_gemm`` and ``torch.ops.awq_ao_cpu.ef_round_block`` (the column sweep
of error-feedback rounding, :mod:`awq_ao.passes.rounding`).

:func:`load` never raises: where the kernels cannot be had (no AVX2/FMA, no compiler, a
failed build, or ``AWQ_AO_CPU_KERNELS=0``) it returns ``False`` and :func:`unavailable_reason`
says why; :mod:`awq_ao.lowering.cpu_kernels` then uses ATen's kernels and its path log names
the reason, and error-feedback rounding its torch loop (the same codes, slower). ``AWQ_AO_CPU_KERNELS=1`` turns a failed build into an error instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import torch

__all__ = ["load", "unavailable_reason", "SOURCE", "SOURCES"]

log = logging.getLogger(__name__)

#: The 4-bit kernels' source file.
SOURCE = Path(__file__).with_name("csrc") / "int4_cpu.cpp"
#: Every source file compiled into the extension, and the header they share.
SOURCES = (SOURCE, SOURCE.with_name("int8_cpu.cpp"), SOURCE.with_name("ef_round_cpu.cpp"))
_HEADERS = (SOURCE.with_name("act_quant.h"),)

#: -fopenmp: at::parallel_for is inline OpenMP code in torch's OpenMP builds; without the flag
#: it runs on one thread. The extension then needs libgomp.so.1, which resolves to the one
#: torch already loaded (torch/lib/libgomp.so.1, same soname): one thread pool, torch's.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def _setting() -> str:
    v = os.environ.get("AWQ_AO_CPU_KERNELS", "auto").strip().lower()
    if v not in ("auto", "0", "1"):
        raise ValueError(f"AWQ_AO_CPU_KERNELS must be 0, 1 or auto, got {v!r}.")
    return v


def _why_not() -> str | None:
    if _setting() == "0":
        return "disabled by AWQ_AO_CPU_KERNELS=0"
    if not (hasattr(torch.cpu, "_is_avx2_supported") and torch.cpu._is_avx2_supported()):
        return "this CPU has no AVX2"
    if not _has_fma():
        return "this CPU has no FMA"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def _has_fma() -> bool:
    """FMA3 (the kernels use it); from /proc/cpuinfo where there is one, else ATen's level."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "fma" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # both imply FMA


def _ninja_on_path() -> None:
    """Make a pip-installed ``ninja`` (in this interpreter's scripts folder) visible."""
    scripts = sysconfig.get_path("scripts")
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    for d in (scripts, str(Path(sys.executable).parent)):
        if d and d not in dirs and (Path(d) / "ninja").exists():
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")


def _build() -> None:
    from torch.utils import cpp_extension

    _ninja_on_path()
    log.info("awq_ao: loading the CPU kernels (the first time on a machine they compile, ~20 s)...")
    # one build folder per source and flags: two awq_ao versions on one machine (or two
    # checkouts) never rebuild over each other's loaded library
    # (and the torch and environment it is built against)
    stamp = " ".join([*_FLAGS, *_LDFLAGS, torch.__version__, sys.prefix])
    text = b"".join(p.read_bytes() for p in (*SOURCES, *_HEADERS))
    digest = hashlib.sha256(text + stamp.encode()).hexdigest()
    cpp_extension.load(
        name=f"awq_ao_int4_cpu_{digest[:12]}",
        sources=[str(p) for p in SOURCES],
        extra_cflags=_FLAGS,
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        verbose=False,
    )
    x = torch.zeros(1, 64)
    packed = torch.zeros(32, 32, dtype=torch.uint8)
    sz = torch.zeros(1, 32, 2, dtype=torch.bfloat16)
    torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz, 64, 32)  # the ops are callable
    torch.ops.awq_ao_cpu.int8_gemm(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), 64)
    _register_fakes()


def _register_fakes() -> None:
    """Meta kernels, so the ops also trace (FakeTensor, torch.compile, export) when called
    directly rather than inside awq_ao's opaque ``w4a16_linear``."""

    @torch.library.register_fake("awq_ao_cpu::int4_gemm")
    def _gemm_fake(x, packed, scales_and_zeros, tg, block):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("awq_ao_cpu::int8_gemm")
    def _int8_fake(x, codes, scale, ag):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("awq_ao_cpu::int4_dequant_t")
    def _dequant_fake(packed, scales_and_zeros, tg, block, b0, b1, out):
        return None


def load() -> bool:
    """Build (first call) and load the kernels; ``True`` if ``torch.ops.awq_ao_cpu`` is usable."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = _why_not()
        if reason is None:
            try:
                _build()
            except Exception as e:  # compiler errors, missing ninja, ...
                last = (str(e).strip().splitlines() or [repr(e)])[-1]
                reason = f"the build failed ({type(e).__name__}: {last[:300]})"
                if _setting() == "1":
                    raise RuntimeError(f"awq_ao: AWQ_AO_CPU_KERNELS=1 but {reason}") from e
                log.warning(
                    "awq_ao: the C++ CPU kernels are unavailable: %s; INT4 layers use ATen's "
                    "slower kernels and error-feedback rounding a slower torch loop. Set "
                    "AWQ_AO_CPU_KERNELS=0 to silence this.",
                    reason,
                )
        elif _setting() == "1":
            raise RuntimeError(f"awq_ao: AWQ_AO_CPU_KERNELS=1 but {reason}")
        _state["reason"] = reason
        _state["ok"] = reason is None
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why the kernels are not used (``None`` if they are, or :func:`load` was not called)."""
    return _state.get("reason")  # type: ignore[return-value]
