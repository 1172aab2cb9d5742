"""Register awq_ao with transformers without importing transformers at ``import awq_ao``.

``import awq_ao`` stays cheap (no torch, no transformers: ``awq-ao --help`` answers at once),
yet the quantization method is registered before transformers can need it: at once if
``transformers.quantizers.auto`` is already imported, otherwise right after transformers
imports it (``PreTrainedModel`` imports it before any ``from_pretrained`` runs). This module
imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__all__ = ["install"]

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    mod = sys.modules.get("awq_ao.integrations.transformers_quantizer")
    if mod is not None and not hasattr(mod, "register_with_transformers"):
        return  # that module is being imported (it imports transformers): it registers at its end
    try:
        from awq_ao.integrations.transformers_quantizer import register_with_transformers

        register_with_transformers()
    except Exception as e:  # noqa: BLE001 - never break the user's transformers import
        import warnings

        warnings.warn(
            f"awq_ao could not register its quantization method with this transformers "
            f"({type(e).__name__}: {e}); from_pretrained will not load awq_ao checkpoints, "
            "awq_ao.load_quantized still does.",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then registers awq_ao."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` with the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
