"""The vLLM kernel limits checked before an AutoAWQ / compressed-tensors export."""

from __future__ import annotations

import pytest
from checkpoint_helpers import quantized

from awq_ao.checkpoint import save_quantized
from awq_ao.checkpoint.vllm_compat import describe_issues, marlin_issues


def test_marlin_limits():
    ok = [("a", 4096, 4096, 4, 128), ("b", 128, 256, 8, -1), ("c", 64, 128, 4, 32)]
    assert marlin_issues(ok) == {}
    bad = marlin_issues([
        ("k576", 576, 576, 4, 64),        # SmolLM2's hidden size: K % 128 != 0
        ("g48", 256, 384, 4, 48),         # group size Marlin has no kernel for
        ("b3", 256, 256, 3, 128),
        ("n96", 96, 256, 4, 128),
    ])
    assert set(bad) == {"k576", "g48", "b3", "n96"}
    assert "in_features 576 not a multiple of 128" in bad["k576"] and "out_features 576" not in bad["k576"]
    assert "group size 48" in bad["g48"] and "3-bit" in bad["b3"] and "out_features 96" in bad["n96"]
    # tensor parallel: each shard must fit
    assert marlin_issues([("x", 4096, 4096, 4, 128)], tensor_parallel=8) == {}
    assert "4096/3" in marlin_issues([("x", 4096, 4096, 4, 128)], tensor_parallel=3)["x"]
    msg = describe_issues(bad, "autoawq", limit=2)
    assert msg.startswith("4 layer(s) of this autoawq export") and "and 2 more" in msg


@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_export_warns_which_layers_vllm_marlin_refuses(fmt, tmp_path):
    with pytest.warns(UserWarning, match=rf"12 layer\(s\) of this {fmt} export will not run on vLLM's Marlin"):
        save_quantized(quantized("llama"), tmp_path / "x", format=fmt)  # hidden 64: K % 128 != 0 (down_proj, K=128, is fine)
