"""AWQConfig's option groups: flat keywords and groups build the same config, every flat name
reads and writes through to its group, defaults live in the groups, validation is unchanged."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao import config as config_mod
from awq_ao.config import (
    FLAT_NAMES,
    GROUPS,
    AWQConfig,
    ClipOptions,
    Execution,
    RoundingOptions,
    SearchOptions,
    Selection,
    WeightFormat,
    awq_config,
)

#: a valid value other than the default for every flat name (the test fails if one is missing)
OTHER = {
    "bits": 3, "group_size": 64, "zero_point": False,
    "scale_search": False, "n_grid": 10, "duo_scaling": "both", "search_refine": True,
    "screen_rows": None, "screen_keep": 6, "search_loss": "linear", "search_rounding": "nearest", "max_search_samples": 4, "max_gram_samples": 8, "channel_stats": "sample", "fallback": "skip",
    "clip": False, "clip_grid": 20, "clip_mode": "range", "max_shrink": 0.25, "clip_qk": True,
    "clip_tokens": 256, "clip_after_rounding": True,
    "rounding": "nearest", "gptq_damp": 0.3, "gptq_act_order": False, "gptq_shared_factor": True, "gptq_refit_rounds": 2, "gptq_float_target": True, "block_refine_steps": 3, "block_refine_lr": 0.01, "block_refine_batch": 2, "max_gram_gib": 1.5,
    "skip": ("lm_head",), "include": ("model.layers.*",), "experts": False, "head": "int8",
    "sequential": True, "device": "cpu", "split_blocks": True, "spill_dir": "/tmp",
    "on_capture_error": "hook_only", "progress": False, "verbose": False,
}


def _group_default(flat: str) -> object:
    gname, fname = FLAT_NAMES[flat]
    (f,) = [f for f in dataclasses.fields(GROUPS[gname]) if f.name == fname]
    return f.default


def _grouped(flat: dict) -> dict:
    """The same options as group objects (one per group that any of them belongs to)."""
    per_group: dict[str, dict] = {}
    for name, value in flat.items():
        gname, fname = FLAT_NAMES[name]
        per_group.setdefault(gname, {})[fname] = value
    return {gname: GROUPS[gname](**fields) for gname, fields in per_group.items()}


# ------------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------------


def test_other_values_cover_every_flat_name():
    assert set(OTHER) == set(FLAT_NAMES)
    assert len(FLAT_NAMES) == 43  # + step and seed: the 30 options of the flat config before 2026-12-06, head, max_gram_samples, screen_rows, screen_keep, search_rounding, gptq_shared_factor, gptq_refit_rounds, channel_stats, clip_after_rounding, gptq_float_target, block_refine_steps/lr/batch
    assert all(OTHER[n] != _group_default(n) for n in OTHER)


def test_groups_are_exported_by_the_package_and_by_config():
    from awq_ao import ClipOptions as PkgClip
    from awq_ao import WeightFormat as PkgFormat
    from awq_ao import options

    assert PkgFormat is WeightFormat and PkgClip is ClipOptions
    for cls in GROUPS.values():  # one class, defined in awq_ao.options, under three import paths
        assert cls.__module__ == "awq_ao.options" and getattr(options, cls.__name__) is cls
        assert getattr(awq_ao, cls.__name__) is cls and getattr(config_mod, cls.__name__) is cls
        assert cls.__name__ in awq_ao.__all__

def test_flat_and_grouped_construction_give_equal_configs():
    flat = AWQConfig(step="prepare", **OTHER)
    grouped = AWQConfig(step="prepare", **_grouped(OTHER))
    assert flat == grouped and repr(flat) == repr(grouped)
    assert awq_config(**OTHER) == awq_config(**_grouped(OTHER)) != awq_config()
    # a group may come with flat keywords of other groups
    mixed = awq_config(weight_format=WeightFormat(bits=3, group_size=64), clip=False, verbose=False)
    assert mixed == awq_config(bits=3, group_size=64, clip=False, verbose=False)
    assert mixed.clip_options == ClipOptions(enabled=False) and mixed.execution == Execution(verbose=False)


def test_groups_are_the_fields_and_flat_names_are_not():
    names = [f.name for f in dataclasses.fields(AWQConfig)]
    assert names == ["step", *GROUPS, "seed"]
    assert not set(FLAT_NAMES) & set(names)  # no group keyword is also a flat keyword
    assert {GROUPS[g] for g, _ in FLAT_NAMES.values()} == set(GROUPS.values())
    for gname, cls in GROUPS.items():  # every group field has exactly one flat name
        covered = sorted(f for g, f in FLAT_NAMES.values() if g == gname)
        assert covered == sorted(f.name for f in dataclasses.fields(cls))
        assert re.sub(r"(?<!^)([A-Z])", r"_\1", cls.__name__).lower() == gname


def test_flat_dict_round_trips():
    cfg = awq_config(step="prepare", **OTHER)
    d = cfg.flat_dict()
    assert list(d) == ["step", *FLAT_NAMES, "seed"]
    assert AWQConfig(**d) == cfg
    assert d["clip_grid"] == 20 and d["step"] == "prepare"


# ------------------------------------------------------------------------------------------------
# flat names read and write through
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FLAT_NAMES))
def test_every_flat_name_reads_and_writes_through(name):
    gname, fname = FLAT_NAMES[name]
    cfg = awq_config()
    before = copy.copy(cfg)
    assert getattr(cfg, name) == getattr(getattr(cfg, gname), fname) == _group_default(name)
    old_group = getattr(cfg, gname)

    setattr(cfg, name, OTHER[name])
    assert getattr(cfg, name) == OTHER[name]
    assert getattr(getattr(cfg, gname), fname) == OTHER[name]
    assert getattr(cfg, gname) is not old_group  # a new (frozen) group: copies share nothing mutable
    assert getattr(old_group, fname) == _group_default(name)
    assert before == awq_config() and getattr(before, name) == _group_default(name)
    for other in FLAT_NAMES:  # nothing else changed
        if other != name:
            assert getattr(cfg, other) == getattr(before, other), other

    # the group route reads back through the flat name
    cfg2 = awq_config(**{gname: GROUPS[gname](**{fname: OTHER[name]})})
    assert getattr(cfg2, name) == OTHER[name] and cfg2 == cfg


def test_groups_are_frozen():
    cfg = awq_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_options.grid = 3  # type: ignore[misc]
    cfg.clip_options = ClipOptions(grid=3)  # replacing a group is fine
    assert cfg.clip_grid == 3


# ------------------------------------------------------------------------------------------------
# defaults
# ------------------------------------------------------------------------------------------------


def test_defaults_are_the_group_defaults():
    cfg = AWQConfig()
    assert cfg == awq_config()
    for gname, cls in GROUPS.items():
        assert getattr(cfg, gname) == cls()
    for name in FLAT_NAMES:
        assert getattr(cfg, name) == _group_default(name), name
        assert getattr(AWQConfig, name) == _group_default(name), name  # class access: the default
    top = {f.name: f.default for f in dataclasses.fields(AWQConfig)}
    assert cfg.step == top["step"] == "convert" and cfg.seed == top["seed"] == 0
    assert cfg.needs_calibration


def test_each_default_is_documented_once_in_its_group():
    for name, (gname, fname) in FLAT_NAMES.items():
        doc = GROUPS[gname].__doc__
        assert re.search(rf"^\s+{fname}:", doc, re.M), (gname, fname)
        assert doc.count(f"(Flat ``{name}``.)") + doc.count(f"(Flat keyword ``{name}``.)") == 1, name
    table = dict(re.findall(r"^\s+(\w+)\s+``(\w+\.\w+)``$", AWQConfig.__doc__, re.M))
    assert table == {n: f"{g}.{f}" for n, (g, f) in FLAT_NAMES.items()}


# ------------------------------------------------------------------------------------------------
# validation: one place, same messages, either route
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"bits": 4.0}, r"bits=4\.0 \(float\).*an integer in 2, 3, 4"),
     ({"bits": 9}, r"bits=9 \(int\)"),
     ({"group_size": 0}, r"group_size=0 \(int\).*integer >= 1, or -1"),
     ({"zero_point": 1}, r"zero_point=1 \(int\).*True or False"),
     ({"scale_search": "yes"}, r"scale_search='yes'"),
     ({"n_grid": 2.0}, r"n_grid=2\.0.*integer >= 1"),
     ({"duo_scaling": 1}, r"duo_scaling=1"),
     ({"search_loss": "mlp"}, r"search_loss='mlp'.*'module' or 'linear'"),
     ({"max_search_samples": 0}, r"max_search_samples=0"),
     ({"fallback": "drop"}, r"fallback='drop'"),
     ({"clip_grid": 0}, r"clip_grid=0 \(int\).*integer >= 1"),
     ({"clip_mode": "lower"}, r"clip_mode='lower'"),
     ({"max_shrink": float("nan")}, r"max_shrink=nan"),
     ({"clip_tokens": "all"}, r"clip_tokens='all'.*or None"),
     ({"rounding": "gtpq"}, r"rounding='gtpq'.*'nearest' or 'gptq'"),
     ({"gptq_damp": 0.0}, r"gptq_damp=0\.0.*> 0"),
     ({"max_gram_gib": -1}, r"max_gram_gib=-1"),
     ({"skip": 3}, r"skip=3.*pattern"),
     ({"include": [1]}, r"include=\[1\]"),
     ({"sequential": 1}, r"sequential=1 \(int\).*'auto'"),
     ({"device": "gpu"}, r"device='gpu'"),
     ({"spill_dir": 3}, r"spill_dir=3"),
     ({"on_capture_error": "ignore"}, r"on_capture_error='ignore'"),
     ({"verbose": None}, r"verbose=None")],
)
def test_bad_values_raise_the_same_message_either_way(kw, match):
    with pytest.raises(ValueError, match=rf"^awq_config: {match}") as flat:
        awq_config(**kw)
    with pytest.raises(ValueError, match=rf"^awq_config: {match}") as grouped:
        awq_config(**_grouped(kw))
    assert str(flat.value) == str(grouped.value)


def test_cross_group_rule_either_way():
    msg = r"spill_dir only applies to layer-by-layer convert"
    with pytest.raises(ValueError, match=msg):
        awq_config(spill_dir="/tmp", sequential=False)
    with pytest.raises(ValueError, match=msg):
        awq_config(execution=Execution(spill_dir="/tmp", sequential=False))


def test_values_are_normalised_through_the_groups():
    cfg = awq_config(selection=Selection(skip="lm_head", include=["model.*"]),
                     execution=Execution(device=torch.device("cpu"), spill_dir=Path("/tmp")))
    assert cfg.selection == Selection(skip=("lm_head",), include=("model.*",))
    assert cfg.device == "cpu" and cfg.spill_dir == "/tmp" and cfg.execution.spill_dir == "/tmp"
    assert cfg == awq_config(skip="lm_head", include=["model.*"], device="cpu", spill_dir="/tmp")
    assert hash(cfg.selection) == hash(Selection(skip=("lm_head",), include=("model.*",)))


def test_group_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match=r"^awq_config: weight_format=\{'bits': 3\} \(dict\).*a WeightFormat"):
        awq_config(weight_format={"bits": 3})
    with pytest.raises(ValueError, match=r"^awq_config: clip_options=SearchOptions\(.*a ClipOptions"):
        awq_config(clip_options=SearchOptions())
    with pytest.raises(ValueError, match=r"^awq_config: clip_options=False \(bool\)"):
        awq_config(clip_options=False)


def test_a_group_and_its_own_flat_keyword_are_refused():
    with pytest.raises(TypeError, match=r"clip_options= and clip=, clip_grid= both given.*ClipOptions\(\.\.\.\)"):
        awq_config(clip_options=ClipOptions(), clip=False, clip_grid=20)
    with pytest.raises(TypeError, match=r"rounding_options= and rounding= both given"):
        AWQConfig(rounding_options=RoundingOptions(method="nearest"), rounding="nearest")


def test_unknown_keyword_is_a_type_error_with_a_hint():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bitz' \(did you mean 'bits'\?\)"):
        awq_config(bitz=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'clip_option' \(did you mean 'clip_options'\?\)"):
        awq_config(clip_option=ClipOptions())
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'xyzzy'$"):
        awq_config(xyzzy=1)


def test_seed_warns_at_the_callers_line():
    with pytest.warns(UserWarning, match="seed has no effect") as rec:
        awq_config(seed=1)
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="seed has no effect") as rec:
        AWQConfig(seed=2)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        awq_config(seed=0)
    with pytest.raises(ValueError, match=r"^awq_config: seed=1\.5"):
        awq_config(seed=1.5)


# ------------------------------------------------------------------------------------------------
# copies, serialisation, torchao
# ------------------------------------------------------------------------------------------------


def test_copies_and_pickles():
    cfg = awq_config(step="prepare", **OTHER)
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    c = copy.copy(cfg)
    c.bits, c.skip = 4, ("x",)
    assert cfg.bits == 3 and cfg.skip == ("lm_head",)
    assert dataclasses.replace(cfg, step="convert") == awq_config(**OTHER)
    r = dataclasses.replace(cfg, weight_format=WeightFormat(bits=5))
    assert r.bits == 5 and r.group_size == 128 and r.clip_grid == 20
    with pytest.raises(TypeError, match="both given"):  # field names only (see AWQConfig's doc)
        dataclasses.replace(cfg, bits=5)
    assert eval(repr(cfg), vars(config_mod)) == cfg  # the grouped repr rebuilds the config


def test_summary_shows_every_group():
    text = awq_config(bits=3, clip_grid=20).summary()
    assert text.splitlines()[0] == "AWQConfig step='convert' seed=0"
    assert "  weight_format: bits=3 group_size=128 zero_point=True" in text.splitlines()
    for gname in GROUPS:
        assert f"  {gname}: " in text


def test_torchao_dispatches_to_the_awq_handler():
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    assert issubclass(AWQConfig, AOBaseConfig) and awq_ao.AWQConfig is AWQConfig
    assert _QUANTIZE_CONFIG_HANDLER[type(awq_config(weight_format=WeightFormat(bits=3)))] is config_mod._awq_transform


def _tensors(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if hasattr(v, "__tensor_flatten__"):
            names, ctx = v.__tensor_flatten__()
            out[k + ":ctx"] = repr(ctx)
            out.update({f"{k}.{n}": getattr(v, n) for n in names})
        else:
            out[k] = v
    return out


def _same(a: object, b: object) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_flat_and_grouped_configs_quantize_identically():
    data = token_batches(2, 2, 16)
    flat_opts = dict(bits=3, n_grid=10, clip_grid=20, gptq_damp=0.2, skip=("model.layers.0.mlp.down_proj",))
    grouped_opts = dict(
        weight_format=WeightFormat(bits=3, group_size=32),
        search_options=SearchOptions(n_grid=10),
        clip_options=ClipOptions(grid=20),
        rounding_options=RoundingOptions(damp=0.2),
        selection=Selection(skip="model.layers.0.mlp.down_proj"),
        execution=Execution(verbose=False, progress=False),
    )
    a, b = tiny_model("llama", layers=1), tiny_model("llama", layers=1)
    ra = awq_ao.quantize(a, data, group_size=32, verbose=False, progress=False, **flat_opts)
    rb = awq_ao.quantize(b, data, **grouped_opts)
    assert ra.quantized == rb.quantized and "model.layers.0.mlp.down_proj" not in ra.quantized
    ta, tb = _tensors(a.state_dict()), _tensors(b.state_dict())
    assert ta.keys() == tb.keys()
    assert any(k.endswith(":ctx") for k in ta)  # INT4 weights were compared by their parts
    assert all(_same(ta[k], tb[k]) for k in ta), [k for k in ta if not _same(ta[k], tb[k])]
    test = token_batches(1, 2, 16, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(a(test).logits, b(test).logits)
