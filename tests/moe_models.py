"""Tiny random transformers MoE models (no downloads) and calibration batches for them, shared
by integration/test_moe.py, integration/test_transformers_integration.py and
checkpoint/test_load_validation.py."""

from __future__ import annotations

import warnings

import torch
import transformers

from devtools.tiny_configs import tiny_config

VOCAB = 200


def tiny_moe(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of a transformers MoE family (no downloads), routers randomised."""
    cls = getattr(transformers, name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(tiny_config(cls))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if n.endswith("weight") else 0.0))
            elif p.dim() == 2 and n.endswith("bias"):
                p.normal_(0, 0.05)
            elif p.dim() == 2 and p.abs().max() == 0:  # zero-initialised routers
                p.normal_(0, 0.5)
    model = model.to(dtype).eval()
    if dtype == torch.float64:  # grouped_mm has no float64 CPU kernel
        model.set_experts_implementation("eager")
    return model


def batches(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g), "use_cache": False} for _ in range(n)]
