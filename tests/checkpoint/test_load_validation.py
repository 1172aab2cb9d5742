"""Issue 15, item 6: wrong metadata or data is refused when a checkpoint is loaded (item 7,
arguments checked at the boundary, is in integration/test_argument_validation.py).

Every attack of item 6 is a test here; two hypothesis fuzzers mutate ``config.json``'s
quantization fields and the safetensors header of a tiny saved checkpoint and assert "a clear
CheckpointError, or a model whose logits equal the original's; never a silently wrong one".
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import logits, mixed_rtn_llama, quantized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import awq_ao
from awq_ao.checkpoint import CheckpointError, load_quantized, save_quantized
from awq_ao.checkpoint.checksums import MANIFEST_NAME
from awq_ao.checkpoint.formats import quantized_keys
from awq_ao.cli import main

FORMATS = ("awq_ao", "autoawq", "compressed-tensors")
LAYER = "model.layers.0.self_attn.q_proj"  # in_features 64: group 32 -> 2 groups, as group 40 gives


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per format of the same tiny AWQ model (group size 32); never modified."""
    base = tmp_path_factory.mktemp("pristine")
    model = quantized("llama")
    return {fmt: save_quantized(model, base / fmt, format=fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def reference(pristine) -> dict[str, torch.Tensor]:
    """Logits of each pristine checkpoint as loaded (autoawq / compressed-tensors are float16)."""
    return {fmt: logits(load_quantized(d)) for fmt, d in pristine.items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of the awq_ao checkpoint, free to damage."""
    return _copy(pristine["awq_ao"], tmp_path / "ckpt")


def _edit_qc(d: Path, fn, file: str = "config.json") -> None:
    cfg = json.loads((d / file).read_text())
    fn(cfg["quantization_config"] if file == "config.json" else cfg)
    (d / file).write_text(json.dumps(cfg))


def _header(shard: Path) -> tuple[int, dict]:
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


_DT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8, "I32": torch.int32}


def _patch_tensor(shard: Path, key: str, fn) -> None:
    """Rewrite the bytes of tensor ``key`` in place (header, size and everything else untouched)."""
    n, h = _header(shard)
    start, stop = h[key]["data_offsets"]
    with open(shard, "r+b") as f:
        f.seek(8 + n + start)
        raw = bytearray(f.read(stop - start))
        t = torch.frombuffer(raw, dtype=_DT[h[key]["dtype"]]).reshape(h[key]["shape"]).clone()
        fn(t)
        f.seek(8 + n + start)
        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def _rewrite_header(shard: Path, fn) -> None:
    """Rewrite ``shard`` with ``fn(header)`` applied and the same data bytes after it (the header
    keeps its length where the edit allows, so the file keeps its size)."""
    n, h = _header(shard)
    data = shard.read_bytes()[8 + n :]
    fn(h)
    raw = json.dumps(h, separators=(",", ":")).encode()
    if len(raw) <= n:
        raw = raw.ljust(n, b" ")  # same length as before (safetensors pads with spaces)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _scale_key(fmt: str, name: str = LAYER) -> str:
    return {"awq_ao": quantized_keys(f"{name}.weight")[1], "autoawq": f"{name}.scales",
            "compressed-tensors": f"{name}.weight_scale"}[fmt]


# ------------------------------------------------------------------------------------------------
# item 6: wrong metadata
# ------------------------------------------------------------------------------------------------


def test_pristine_checkpoints_load_and_verify(pristine, reference):
    for fmt, d in pristine.items():
        assert (d / MANIFEST_NAME).is_file()
        assert torch.equal(logits(load_quantized(d, verify=True)), reference[fmt])


def test_group_size_with_the_same_group_count_is_refused(ckpt):
    # the attack: 40 instead of 32 gives ceil(64 / 40) = 2 groups too (and 4 for K=128)
    _edit_qc(ckpt, lambda qc: qc.update(group_size=40))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.group_size is 40, but the checkpoint was saved with 32"):
        load_quantized(ckpt)


def test_per_layer_group_size_override_is_refused(ckpt):
    _edit_qc(ckpt, lambda qc: qc.update(module_overrides={LAYER: {"group_size": 40}}))
    with pytest.raises(CheckpointError, match=r"module_overrides.*q_proj.*group_size.*40"):
        load_quantized(ckpt)


def test_edited_config_and_manifest_config_still_refused_per_layer(ckpt):
    """Even with the manifest's copy of the config edited the same way, each layer's recorded
    (bits, group size) disagrees with what config.json now plans."""
    _edit_qc(ckpt, lambda qc: qc.update(group_size=40))
    m = json.loads((ckpt / MANIFEST_NAME).read_text())
    m["quantization_config"]["group_size"] = 40
    (ckpt / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d\.\S+: config\.json gives group_size 40 \(saved: 32\)"):
        load_quantized(ckpt)


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize(
    ("field", "value"),
    [("group_size", 0), ("group_size", -2), ("group_size", 32.0), ("group_size", "32"), ("group_size", True),
     ("group_size", None), ("bits", 4.0), ("bits", "4"), ("bits", True), ("bits", 0), ("bits", -4), ("bits", 9)],
)
def test_bad_bits_and_group_size_types(ckpt, field, value, manifest):
    if not manifest:
        (ckpt / MANIFEST_NAME).unlink()  # the type checks do not depend on it
    _edit_qc(ckpt, lambda qc: qc.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: quantization_config\.{field} is .*expected an integer"):
        load_quantized(ckpt)


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [("module_overrides", {LAYER: {"group_size": 0}}, r"module_overrides\[.*q_proj'\]\.group_size is 0"),
     ("module_overrides", {LAYER: {"bits": 4.5}}, r"module_overrides\[.*q_proj'\]\.bits is 4\.5"),
     ("module_overrides", {LAYER: 32}, r"module_overrides\[.*q_proj'\] is 32"),
     ("quantized_modules", "model.layers.0", r"quantized_modules is 'model\.layers\.0' \(a str\)"),
     ("zero_point", "yes", r"zero_point is 'yes'"),
     ("tied_weights", {"lm_head.weight": 3}, r"tied_weights\['lm_head\.weight'\] is 3")],
)
def test_bad_nested_awq_ao_fields(ckpt, where, value, match):
    (ckpt / MANIFEST_NAME).unlink()
    _edit_qc(ckpt, lambda qc: qc.update({where: value}))
    with pytest.raises(CheckpointError, match=match):
        load_quantized(ckpt)


@pytest.mark.parametrize(
    ("fmt", "edit", "match"),
    [("autoawq", lambda qc: qc.update(group_size=0), r"group_size is 0"),
     ("autoawq", lambda qc: qc.update(group_size="32"), r"group_size is '32'"),
     ("autoawq", lambda qc: qc.update(bits=4.0), r"bits is 4\.0"),
     ("autoawq", lambda qc: qc.update(bits=True), r"bits is True \(a bool\)"),
     ("autoawq", lambda qc: qc.update(zero_point="no"), r"zero_point is 'no'"),
     ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4.0), r"num_bits is 4\.0"),
     ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=0), r"group_size is 0"),
     ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size="32"), r"group_size is '32'"),
     ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric="no"), r"symmetric is 'no'")],
)
def test_bad_fields_of_the_other_formats(pristine, tmp_path, fmt, edit, match):
    d = _copy(pristine[fmt], tmp_path / "c")
    (d / MANIFEST_NAME).unlink()  # as written by AutoAWQ / llm-compressor
    _edit_qc(d, edit)
    with pytest.raises(CheckpointError, match=rf"config\.json: quantization_config\..*{match}.*expected"):
        load_quantized(d)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0, -0.01])
def test_bad_scale_values_are_refused(pristine, tmp_path, fmt, value):
    d = _copy(pristine[fmt], tmp_path / "c")
    key = _scale_key(fmt)

    def poison(t: torch.Tensor) -> None:
        t.view(-1)[1] = value

    _patch_tensor(d / "model.safetensors", key, poison)  # header and size unchanged: manifest passes
    what = "NaN or infinite" if value != value or abs(value) == float("inf") else "zero or negative"
    with pytest.raises(CheckpointError, match=rf"{LAYER}: 1 scale\(s\) are {what}.*--verify"):
        load_quantized(d)


def test_zero_points_out_of_range_are_refused(ckpt, tmp_path):
    _patch_tensor(ckpt / "model.safetensors", quantized_keys(f"{LAYER}.weight")[2], lambda t: t.view(-1).__setitem__(0, 16))
    with pytest.raises(CheckpointError, match=rf"{LAYER}: 1 zero point\(s\) outside the integers 0\.\.15"):
        load_quantized(ckpt)
    # 3-bit layer: zero points above 7 are refused too
    d = save_quantized(mixed_rtn_llama(), tmp_path / "mixed")
    k3 = "model.layers.0.self_attn.k_proj"
    _patch_tensor(d / "model.safetensors", quantized_keys(f"{k3}.weight")[2], lambda t: t.view(-1).__setitem__(0, 8))
    with pytest.raises(CheckpointError, match=rf"{k3}: 1 zero point\(s\) outside the integers 0\.\.7 of 3-bit"):
        load_quantized(d)


def test_flipped_data_bytes_caught_by_verify(ckpt, capsys):
    codes = quantized_keys(f"{LAYER}.weight")[0]
    _patch_tensor(ckpt / "model.safetensors", codes, lambda t: t.view(-1).__setitem__(0, int(t.view(-1)[0]) ^ 0x11))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_quantized(ckpt, verify=True)
    assert main(["info", str(ckpt), "--verify"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_info_verify_reports_a_clean_checkpoint(pristine, capsys):
    assert main(["info", str(pristine["awq_ao"]), "--verify"]) == 0
    assert "verified:       1 shard(s)" in capsys.readouterr().out
    assert main(["info", str(pristine["autoawq"]), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]["shards"] == 1


def test_verify_without_checksums_is_an_error(ckpt, capsys):
    (ckpt / MANIFEST_NAME).unlink()
    load_quantized(ckpt)  # still loads, with the metadata checks
    with pytest.raises(CheckpointError, match="no checksums to verify"):
        load_quantized(ckpt, verify=True)
    assert main(["info", str(ckpt), "--verify"]) == 1
    assert "no checksums" in capsys.readouterr().err


def test_header_edit_is_refused(ckpt):
    # bfloat16 <-> float16 has the same size: the data would be reinterpreted silently
    key = _scale_key("awq_ao")
    _rewrite_header(ckpt / "model.safetensors", lambda h: h[key].update(dtype={"BF16": "F16", "F16": "BF16"}[h[key]["dtype"]]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its safetensors header .* differs"):
        load_quantized(ckpt)


def test_extended_or_truncated_shard_is_refused(ckpt):
    shard = ckpt / "model.safetensors"
    with open(shard, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"has \d+ bytes, but it was saved with \d+"):
        load_quantized(ckpt)


def test_damaged_manifest_is_named(ckpt):
    (ckpt / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_NAME}: not a valid awq_ao manifest"):
        load_quantized(ckpt)
    (ckpt / MANIFEST_NAME).write_text(json.dumps({"writer": "awq_ao", "version": 1, "shards": []}))
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_NAME}: malformed manifest"):
        load_quantized(ckpt)


def test_dropped_quantized_layer_in_config_is_refused(ckpt):
    _edit_qc(ckpt, lambda qc: qc["quantized_modules"].remove(LAYER))
    with pytest.raises(CheckpointError, match=rf"quantized_modules drops \[\"{LAYER}\"\]"):
        load_quantized(ckpt)


# ------------------------------------------------------------------------------------------------
# old-style AutoAWQ quant_config.json
# ------------------------------------------------------------------------------------------------


def _old_style(pristine: Path, dst: Path, quant_config: str) -> Path:
    d = _copy(pristine, dst)
    (d / MANIFEST_NAME).unlink()
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "quant_config.json").write_text(quant_config)
    return d


def test_old_style_autoawq_quant_config(pristine, reference, tmp_path):
    good = json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"})
    d = _old_style(pristine["autoawq"], tmp_path / "ok", good)
    assert torch.equal(logits(load_quantized(d)), reference["autoawq"])
    d = _old_style(pristine["autoawq"], tmp_path / "bad", "zero_point: True\nw_bit = 4\n")
    with pytest.raises(CheckpointError, match=r"quant_config\.json: not valid JSON .*Fix the file"):
        load_quantized(d)
    d = _old_style(pristine["autoawq"], tmp_path / "list", "[4, 32]")
    with pytest.raises(CheckpointError, match=r"quant_config\.json: expected a JSON object"):
        load_quantized(d)
    d = _old_style(pristine["autoawq"], tmp_path / "float", json.dumps({"q_group_size": 32.0, "w_bit": 4}))
    with pytest.raises(CheckpointError, match=r"quant_config\.json: quantization_config\.q_group_size is 32\.0"):
        load_quantized(d)


# ------------------------------------------------------------------------------------------------
# fuzzers: "a clear CheckpointError, or a model whose logits equal the original's"
# ------------------------------------------------------------------------------------------------

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 130), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "4", "32", "awq_ao", "gemm", LAYER]),
    st.lists(st.sampled_from([LAYER, "model.norm", "lm_head", 4]), max_size=3),
    st.fixed_dictionaries({}, optional={LAYER: st.fixed_dictionaries({}, optional={
        "bits": st.sampled_from([2, 3, 4, 8, 4.0, True]), "group_size": st.sampled_from([-1, 0, 16, 32, 40, 64, 33])})}),
)
_DELETE = object()


def _mutate(obj: dict, path: list, value) -> None:
    for p in path[:-1]:
        obj = obj[p]
    if value is _DELETE:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


def _paths(qc: dict, prefix: tuple = ()) -> list[list]:
    out = []
    for k, v in qc.items():
        out.append([*prefix, k])
        if isinstance(v, dict):
            out.extend(_paths(v, (*prefix, k)))
    return out


def _outcome(d: Path, ref: torch.Tensor, strict: bool) -> None:
    """A CheckpointError, or (strict) logits equal to ``ref`` / (not strict) any loaded model."""
    try:
        model = load_quantized(d)
    except CheckpointError as e:
        assert str(e)  # a clear message, whatever it is
        return
    if strict:
        got = logits(model)
        assert torch.equal(got, ref), "a mutated checkpoint loaded with different logits"


# AWQ_AO_FUZZ_EXAMPLES=1000 (and AWQ_AO_FUZZ_RANDOM=1) for a longer local hunt
_FUZZ = settings(max_examples=int(os.environ.get("AWQ_AO_FUZZ_EXAMPLES", "40")), deadline=None,
                 derandomize=not os.environ.get("AWQ_AO_FUZZ_RANDOM"),
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", FORMATS)
@_FUZZ
@given(data=st.data())
def test_fuzz_config_quantization_fields(pristine, reference, fmt, data):
    qc = json.loads((pristine[fmt] / "config.json").read_text())["quantization_config"]
    path = data.draw(st.sampled_from(_paths(qc) + [["bits"], ["group_size"], ["module_overrides"]]), label="field")
    value = data.draw(st.one_of(st.just(_DELETE), _ANY), label="value")
    manifest = data.draw(st.booleans(), label="keep manifest")
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(pristine[fmt], Path(tmp) / "c")
        if not manifest:
            (d / MANIFEST_NAME).unlink()
        try:
            _edit_qc(d, lambda q: _mutate(q, path, value))
        except (KeyError, TypeError, IndexError):
            return  # the path does not exist after an earlier part was replaced
        # with the manifest nothing wrong loads; without it (another tool's checkpoint) every
        # failure is still a CheckpointError, never a raw exception
        _outcome(d, reference[fmt], strict=manifest)


_ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "X"]


@pytest.mark.parametrize("fmt", ["awq_ao", "autoawq"])
@_FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(pristine, reference, fmt, data):
    shard = pristine[fmt] / "model.safetensors"
    _, header = _header(shard)
    names = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(names + ["__metadata__"]), label="tensor")
    what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "metadata"]), label="edit")
    manifest = data.draw(st.booleans(), label="keep manifest")

    def edit(h: dict) -> None:
        if key == "__metadata__" or what == "metadata":
            h["__metadata__"] = data.draw(st.dictionaries(st.sampled_from(["format", "quant_format", "x"]),
                                                          st.sampled_from(["pt", "awq_ao", "np", ""]), max_size=2))
        elif what == "drop":
            del h[key]
        elif what == "rename":
            h[data.draw(st.sampled_from([key + "_x", names[0], LAYER + ".weight", "lm_head.weight"]))] = h.pop(key)
        elif what == "dtype":
            h[key]["dtype"] = data.draw(st.sampled_from(_ST_DTYPES))
        elif what == "shape":
            shape = list(h[key]["shape"])
            h[key]["shape"] = data.draw(st.one_of(st.just(shape[::-1]), st.lists(st.integers(0, 130), max_size=3),
                                                  st.just([*shape, 1]), st.just("x")))
        else:
            a, b = h[key]["data_offsets"]
            da, db = data.draw(st.integers(-8, 8)), data.draw(st.integers(-8, 8))
            h[key]["data_offsets"] = [a + da, b + db]

    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(pristine[fmt], Path(tmp) / "c")
        if not manifest:
            (d / MANIFEST_NAME).unlink()
        _rewrite_header(d / "model.safetensors", edit)
        _outcome(d, reference[fmt], strict=manifest)


def test_int4_moe_experts_are_checked_too(tmp_path):
    from moe_models import tiny_moe

    model = tiny_moe("Qwen3MoeForCausalLM")
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, progress=False, verbose=False)
    out = save_quantized(model, tmp_path / "ckpt")
    key = sorted(json.loads((out / "config.json").read_text())["quantization_config"]["quantized_experts"])[0]
    bad = _copy(out, tmp_path / "nan")
    _patch_tensor(bad / "model.safetensors", quantized_keys(key)[1], lambda t: t.view(-1).__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match=rf"{key}: 1 scale\(s\) are NaN or infinite \(first at \[0, 1, 1\]\)"):
        load_quantized(bad)
    bad = _copy(out, tmp_path / "gs")
    _edit_qc(bad, lambda qc: qc["quantized_experts"][key].update(group_size=40))
    with pytest.raises(CheckpointError, match=rf"quantized_experts differs from the saved one: \['{key}'\]"):
        load_quantized(bad)
    (bad / MANIFEST_NAME).unlink()
    _edit_qc(bad, lambda qc: qc["quantized_experts"][key].update(group_size=True))
    with pytest.raises(CheckpointError, match=rf"quantized_experts\['{key}'\]\.group_size is True \(a bool\)"):
        load_quantized(bad)


def test_sharded_checkpoint_verifies_and_swapped_shards_are_refused(tmp_path, reference):
    out = save_quantized(quantized("llama"), tmp_path / "ckpt", max_shard_size="30KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and len(json.loads((out / MANIFEST_NAME).read_text())["shards"]) == len(shards)
    assert torch.equal(logits(load_quantized(out, verify=True)), reference["awq_ao"])
    # a shard replaced by a copy of another one, index untouched
    shutil.copyfile(shards[0], shards[1])
    with pytest.raises(CheckpointError, match=rf"shard .*{shards[1].name}|tensor .* appears in both|index lists tensor"):
        load_quantized(out)
