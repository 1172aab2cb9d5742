"""transformers ``from_pretrained`` / ``save_pretrained`` of awq_ao checkpoints (the quantizer
registered on ``import awq_ao``), compared with :func:`awq_ao.load_quantized`."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_helpers import logits, mixed_rtn_llama, quantized
from moe_models import batches, tiny_moe
from safetensors.torch import load_file, save_file

import awq_ao
from awq_ao.checkpoint import load_quantized, save_quantized
from awq_ao.integrations import AwqAoHfQuantizer, AwqAoQuantizationConfig
from awq_ao.lowering import Int4WeightTensor
from awq_ao.lowering.scaled_input import ScaledInputLinear


def _from_pretrained(path: Path, **kw) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _model(arch: str) -> torch.nn.Module:
    return mixed_rtn_llama() if arch == "mixed" else quantized(arch)


def _quantized_modules(model: torch.nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int4WeightTensor)}


# gpt2: Conv1D layers and ScaledInputLinear (mlp.c_proj has no foldable producer);
# mixed: 4-bit g32, 3-bit ragged g48, 8-bit byte codes, 2-bit, per-channel groups
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "tied_llama", "mixed"])
def test_from_pretrained_matches_load_quantized(arch, tmp_path):
    model = _model(arch)
    out = save_quantized(model, tmp_path / "ckpt")
    ref = load_quantized(out)
    hf = _from_pretrained(out)
    assert isinstance(hf.hf_quantizer, AwqAoHfQuantizer) and hf.is_quantized
    assert _quantized_modules(hf) == _quantized_modules(ref) and _quantized_modules(hf)
    if arch == "gpt2":
        assert any(isinstance(m, ScaledInputLinear) for m in hf.modules())
    assert torch.equal(logits(hf), logits(ref))
    assert torch.equal(logits(hf), logits(model))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, ref.generate(ids, max_new_tokens=6, do_sample=False))

    # save_pretrained writes the awq_ao format again: both loaders read it, same logits
    hf.save_pretrained(tmp_path / "resaved")
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq_ao" and qc["format_version"] == 3
    assert torch.equal(logits(_from_pretrained(tmp_path / "resaved")), logits(ref))
    assert torch.equal(logits(load_quantized(tmp_path / "resaved")), logits(ref))


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "GptOssForCausalLM"])
def test_from_pretrained_int4_experts(name, tmp_path):
    model = tiny_moe(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(model, batches(2), group_size=32, n_grid=3, progress=False, verbose=False)
    out = save_quantized(model, tmp_path / "ckpt")
    hf = _from_pretrained(out)
    assert any((isinstance(p, Int4WeightTensor) and p.dim() == 3) for p in hf.parameters())
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert torch.equal(hf(ids, use_cache=False).logits, want)
    hf.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(_from_pretrained(tmp_path / "resaved")(ids, use_cache=False).logits, want)
    if name == "MixtralForCausalLM":  # format version 2 (experts codes named *_packed)
        _to_old_naming(out, 2)
        for m in (load_quantized(out), _from_pretrained(out)):
            assert not any(n.endswith("experts.gate_up_proj") for n, _ in m.named_buffers())
            with torch.no_grad():
                assert torch.equal(m(ids, use_cache=False).logits, want)


def test_dtype_device_map_and_shards(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt", max_shard_size="20KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    hf = _from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    ref = load_quantized(out, dtype=torch.bfloat16)
    w = hf.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(hf), logits(ref))


def test_save_pretrained_of_a_model_quantized_in_process(tmp_path):
    model = quantized("qwen2")
    assert isinstance(model.hf_quantizer, AwqAoHfQuantizer)
    model.save_pretrained(tmp_path / "sp")
    assert torch.equal(logits(_from_pretrained(tmp_path / "sp")), logits(model))
    assert torch.equal(logits(load_quantized(tmp_path / "sp")), logits(model))


def test_without_import_awq_ao_loading_fails_loudly(tmp_path):
    """A process that never imports awq_ao must not get a model with random weights."""
    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert 'awq_ao' not in sys.modules\n"
        "print('LOADED')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "size mismatch" in r.stdout + r.stderr or "ignore_mismatched_sizes" in r.stdout + r.stderr


def _to_old_naming(path: Path, version: int) -> None:
    """Rewrite a version-3 checkpoint as awq_ao wrote versions 1-2 (codes as ``*_packed``)."""
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    params = [f"{n}.weight" for n in qc["quantized_modules"]] + list(qc.get("quantized_experts") or {})
    tensors = load_file(str(path / "model.safetensors"))
    for p in params:
        codes = tensors.pop(p)
        tensors[f"{p}_packed"] = codes.squeeze(-1).contiguous() if codes.shape[-1] == 1 else codes
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc["format_version"] = version
    (path / "config.json").write_text(json.dumps(cfg))
    for f in path.iterdir():  # files later awq_ao versions write next to the shards
        if f.name not in ("config.json", "generation_config.json", "model.safetensors", ".awq_ao-checkpoint"):
            f.unlink()


@pytest.mark.parametrize("arch", ["mixed", "gpt2"])
def test_version_1_checkpoints_still_load(arch, tmp_path):
    model = _model(arch)
    out = save_quantized(model, tmp_path / "ckpt")
    _to_old_naming(out, 1)
    want = logits(model)
    assert torch.equal(logits(load_quantized(out)), want)
    assert torch.equal(logits(_from_pretrained(out)), want)


def test_quantizing_inside_from_pretrained_is_refused(tmp_path):
    """awq_ao needs calibration data: a float model with an awq_ao config is a clear error."""
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="pre-quantized"):
        _from_pretrained(tmp_path / "float", quantization_config=AwqAoQuantizationConfig())


def test_import_awq_ao_and_help_import_no_torch():
    """``import awq_ao`` and ``awq-ao --help`` load neither torch nor transformers."""
    code = (
        "import sys, contextlib, io\n"
        "import awq_ao\n"
        "from awq_ao.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'usage: awq-ao' in out.getvalue(), out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'torchao') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("first", ["import awq_ao\nimport transformers", "from transformers import LlamaForCausalLM\nimport awq_ao"])
def test_registered_whatever_the_import_order(first, tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    code = (
        f"{first}\n"
        "import transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj.weight).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "Int4WeightTensor"


def test_from_pretrained_runs_the_load_checks(tmp_path):
    """from_pretrained refuses what load_quantized refuses: edited metadata, damaged values."""
    from awq_ao.checkpoint import CheckpointError

    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 40  # same number of groups for in_features 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="group_size"):
        _from_pretrained(out)

    out = save_quantized(quantized("llama"), tmp_path / "nan")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight_scale"][3, 1] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "awq_ao_manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"up_proj: 1 scale\(s\) are NaN"):
        _from_pretrained(out)


def test_save_pretrained_over_a_save_quantized_folder(tmp_path):
    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ckpt")
    _from_pretrained(out).save_pretrained(out)  # rewrites the shards; the manifest is now stale
    with pytest.warns(UserWarning, match="ignoring awq_ao_manifest.json: the shards were rewritten by save_pretrained"):
        got = load_quantized(out)
    assert torch.equal(logits(got), logits(model))


def test_a_failing_registration_warns_and_never_breaks_transformers(monkeypatch):
    from awq_ao.integrations import import_hook, transformers_quantizer

    def broken() -> bool:
        raise RuntimeError("registry API changed")

    monkeypatch.setattr(transformers_quantizer, "register_with_transformers", broken)
    with pytest.warns(UserWarning, match="could not register its quantization method.*registry API changed"):
        import_hook._register()


def test_from_pretrained_model_compiles(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt")
    hf = _from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        eager = hf(ids, use_cache=False).logits
        compiled = torch.compile(hf, fullgraph=True)(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
