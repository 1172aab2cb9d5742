"""Peer quantizers for benchmarks/quality.py, each run inside its own virtual environment.

Every function here quantizes the float32 SmolLM2 model in place with the benchmark's own
calibration blocks (the ``[n, seq_len]`` token tensor every method gets, in batches of 8) and
returns what the row records: the peer's versions, its exact recipe/arguments, any patch
applied, and how the result is evaluated. None of them writes a checkpoint: the quantized
model is evaluated in memory, fake-quantized (weights on the peer's INT grid, dequantized to
float32), because neither peer has a CPU kernel for its packed INT4/INT3 format.

The venvs (``benchmarks/.venvs/<name>``, made by ``benchmarks/peers/<name>_setup.sh``) do not
contain awq_ao: quality.py runs their python with ``PYTHONPATH`` set to the repository, and
only ``awq_ao.evaluation`` (torch + transformers) is imported there.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (missing ones as ``"not installed"``)."""
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# llm-compressor: GPTQModifier, and AWQModifier followed by GPTQModifier
# --------------------------------------------------------------------------------------------
LLMC_METHODS = ("llmc_gptq", "llmc_awq_gptq")


def _llmc_cpu_patch() -> list[str]:
    """The one patch llm-compressor 0.14 needs on a CPU-only torch.

    AWQModifier pins its cached block inputs (``IntermediatesCache.pin_memory``) before each
    grid search, to speed up host-to-GPU copies; on a torch without an accelerator
    ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is available",
    so the AWQ recipe cannot run on CPU at all. Pinning only affects transfer speed, so it is
    made a no-op, and only where no accelerator exists. GPTQModifier alone never calls it.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return []

    def _no_pin(self, batch_index, input_names=None):  # noqa: ARG001 - same signature
        return None

    IntermediatesCache.pin_memory = _no_pin
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory made a no-op "
            "(CPU-only torch: Tensor.pin_memory() raises without an accelerator)"]


def llmcompressor_quantize(model, tokenizer, blocks, method: str, bits: int, group_size: int,
                           batch_size: int = 8) -> dict:
    """Run llm-compressor's ``oneshot`` with the GPTQ or AWQ+GPTQ recipe on ``model`` (CPU)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    patches = _llmc_cpu_patch() if method == "llmc_awq_gptq" else []
    # asymmetric INT{bits}, one (scale, zero) per group along in_features, as awq_ao stores
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": group_size}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    # GPTQModifier's own defaults otherwise: block_size=128, dampening_frac=0.01, actorder=static
    gptq_args = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                 "ignore": ["lm_head"]}
    gptq = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    recipe_desc: list[dict] = []
    recipe: list = []
    if method == "llmc_awq_gptq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQModifier's defaults: mappings inferred from the architecture, duo_scaling=True,
        # n_grid=20; it only smooths, the following GPTQModifier supplies the scheme
        recipe.append(AWQModifier())
        recipe_desc.append({"AWQModifier": {"defaults": "mappings inferred, duo_scaling=True, n_grid=20"}})
    recipe.append(gptq)
    recipe_desc.append({"GPTQModifier": {**gptq_args,
                                         "defaults": "block_size=128, dampening_frac=0.01, actorder=static"}})
    rows = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks]
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False)  # default collate stacks them
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=loader)
    n_quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    return {
        "quantized_linears": n_quantized,
        "peer": "llm-compressor",
        "peer_versions": versions("llmcompressor", "compressed-tensors", "transformers", "torch"),
        "recipe": recipe_desc,
        "oneshot_args": {"dataset": f"DataLoader over the benchmark's blocks, batch_size={batch_size}, in order",
                         "pipeline": "independent (default: sequential per decoder layer)"},
        "patches": patches,
        "evaluated_as": "fake-quantized: compressed-tensors' frozen quantized forward (weights on the INT grid, float32 compute)",
    }


# --------------------------------------------------------------------------------------------
# AutoRound (Intel auto-round): its default and light recipes
# --------------------------------------------------------------------------------------------
# auto_round.cli.main.RECIPES of auto-round 0.16.1 ("default" and "light"), without their
# nsamples/seqlen (128 x 2048): every method here gets the benchmark's calibration blocks.
AUTOROUND_RECIPES: dict[str, dict] = {
    "autoround": {"iters": 200, "lr": None, "batch_size": 8},
    "autoround_light": {"iters": 50, "lr": 5e-3, "batch_size": 8},
}


def autoround_quantize(model, tokenizer, blocks, method: str, bits: int, group_size: int,
                       iters: int | None = None) -> tuple[object, dict]:
    """AutoRound (SignRound) on CPU with the default or light recipe; ``iters`` overrides it.

    Returns the quantized model (AutoRound's own reference to it) and the row's record.
    """
    from auto_round import AutoRound

    recipe = dict(AUTOROUND_RECIPES[method])
    if iters is not None:
        recipe["iters"] = iters
    bs = recipe["batch_size"]
    data = [blocks[i : i + bs] for i in range(0, blocks.shape[0], bs)]
    # scheme W4A16 is AutoRound's default (symmetric, group 128); bits / group_size override
    # its width and group, sym is left at the scheme's default
    args = {"scheme": "W4A16", "bits": bits, "group_size": group_size, "iters": recipe["iters"],
            "lr": recipe["lr"], "batch_size": bs, "nsamples": int(blocks.shape[0]),
            "seqlen": int(blocks.shape[1]), "device_map": "cpu", "seed": 42}
    ar = AutoRound(model, tokenizer=tokenizer, dataset=data, **args)
    res = ar.quantize()  # (model, layer_config)
    layer_config = res[1] if isinstance(res, tuple) and len(res) > 1 and isinstance(res[1], dict) else {}
    n_quantized = sum(1 for c in layer_config.values() if isinstance(c, dict) and c.get("bits", 16) < 16)
    qmodel = getattr(ar, "model", None)
    qmodel = model if qmodel is None else qmodel
    qargs = {k: getattr(ar, k, None) for k in ("bits", "group_size", "sym", "data_type")}
    return qmodel, {
        "quantized_linears": n_quantized,
        "peer": "auto-round",
        "peer_versions": versions("auto-round", "transformers", "torch"),
        "recipe": {"name": "light" if method == "autoround_light" else "default",
                   **({"iters_override": iters} if iters is not None else {})},
        "autoround_args": {**args, "dataset": f"the benchmark's blocks in batches of {bs}"},
        "resolved": {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                     for k, v in qargs.items()},
        "patches": [],
        "evaluated_as": "fake-quantized: AutoRound writes the dequantized weights into the float32 model (no export)",
    }
