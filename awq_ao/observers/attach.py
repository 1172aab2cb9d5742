"""The prepare step: choose the layers to quantize and attach observers to them."""

from __future__ import annotations

import fnmatch
import inspect
import warnings

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.observers.activation import ChannelStatsObserver, RootCallRecorder
from awq_ao.state import AWQState, get_state, set_state

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def conv1d_class() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` class (weight stored as [in, out]), if installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_quantizable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``."""
    c1d = conv1d_class()
    return isinstance(module, nn.Linear) or (c1d is not None and isinstance(module, c1d))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a quantizable module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: [in, out]
    return int(w.shape[0]), int(w.shape[1])


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of linears that produce the logits or share a weight with another module."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except Exception:
            head = None
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(mname)
        if head is not None and mod is head:
            names.add(mname)
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if is_quantizable(mod) and isinstance(w, torch.Tensor) and len(owners[id(w)]) > 1:
            names.add(mname)
    return names


def select_targets(model: nn.Module, config: AWQConfig) -> list[str]:
    """Names of the modules awq_ao will quantize, with clear errors for impossible requests."""
    heads = output_head_names(model)
    targets: list[str] = []
    for name, mod in model.named_modules():
        if name == "":
            continue
        wanted = config.include is None or _matches(name, config.include)
        if not is_quantizable(mod):
            if config.include is not None and wanted and _matches_explicit(name, config.include):
                raise ValueError(
                    f"module {name!r} ({type(mod).__name__}) was asked for in include= but "
                    "cannot be quantized: awq_ao quantizes nn.Linear and transformers' Conv1D. "
                    "Remove it from include=."
                )
            continue
        if not wanted or _matches(name, config.skip) or name in heads:
            continue
        w = mod.weight
        if w.dtype not in SUPPORTED_WEIGHT_DTYPES:
            raise TypeError(
                f"module {name!r} has weight dtype {w.dtype}; awq_ao quantizes float32, "
                "float16 and bfloat16 weights. Convert the model (e.g. model.float()) or add "
                f"{name!r} to skip=."
            )
        if w.is_meta:
            raise ValueError(
                f"module {name!r} has its weight on the meta device (no values: a model built "
                "under torch.device('meta') / init_empty_weights, or loaded with a device_map that "
                "offloads it); AWQ needs every weight's values, in every mode. Load the real "
                "weights first, e.g. AutoModelForCausalLM.from_pretrained(path) without device_map; "
                "to quantize a model larger than the GPU, keep it on the CPU and pass device='cuda' "
                "(layer by layer, one block on the GPU at a time)."
            )
        targets.append(name)
    return targets


def _matches_explicit(name: str, patterns: tuple[str, ...]) -> bool:
    """True if a pattern names this module exactly (no wildcard)."""
    return any(p == name for p in patterns)


def prepare(model: nn.Module, config: AWQConfig) -> AWQState:
    """Attach observers to every target linear and a recorder to the root module.

    Calling prepare again replaces the earlier observers (statistics start afresh).
    """
    old = get_state(model)
    if old is not None:
        if old.phase == "converted":
            raise RuntimeError("this model was already converted by awq_ao; prepare a fresh copy.")
        old.remove_hooks()
    targets = select_targets(model, config)
    if not targets:
        raise ValueError(
            "no quantizable layer found: awq_ao quantizes nn.Linear and transformers' Conv1D "
            "modules (the output head is kept in full precision). Check include=/skip=."
        )
    state = AWQState(phase="prepared", targets=targets)
    modules = dict(model.named_modules())
    for name in targets:
        mod = modules[name]
        obs = ChannelStatsObserver(name, in_out_features(mod)[0])
        state.observers[name] = obs
        state.handles.append(mod.register_forward_pre_hook(obs))
    rec = RootCallRecorder(max_rows=max(config.max_search_samples, config.max_gram_samples))
    state.recorder = rec
    state.handles.append(model.register_forward_pre_hook(rec, with_kwargs=True))
    set_state(model, state)
    if model.training:
        warnings.warn(
            "model is in training mode; calibrate in eval mode (model.eval()) so dropout "
            "does not distort the statistics.",
            stacklevel=2,
        )
    return state


def accepts_kwarg(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword argument ``name``."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters
