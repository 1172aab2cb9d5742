"""awq_ao as a transformers quantization method: ``from_pretrained`` / ``save_pretrained``.

After ``import awq_ao``::

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/awq_ao-checkpoint")

builds the INT4 model directly: transformers creates the model on the meta device, the
quantizer below gives every quantized linear (and INT4 experts parameter) the parameters the
checkpoint holds (uint8 codes under the float weight's own name, ``*_scale``, ``*_zero``),
transformers fills them from the memory-mapped shards on the devices of ``device_map``, and
after loading each one becomes an ``nn.Linear`` holding an
:class:`~awq_ao.lowering.Int4WeightTensor` packed for its device, exactly as
:func:`awq_ao.load_quantized` builds it. ``model.save_pretrained(dir)`` writes the awq_ao
format again.

Without ``import awq_ao`` transformers does not know ``quant_method: "awq_ao"``; it then tries
to load the uint8 codes into the float weights and fails on the shape mismatch (format version
3; older checkpoints load as random weights there, re-save them with awq_ao).
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from awq_ao.checkpoint.formats import (
    FORMAT_AWQ_AO,
    FORMAT_VERSION,
    CheckpointError,
    LoadPlan,
    ShardSet,
)

__all__ = ["QUANT_METHOD", "AwqAoQuantizationConfig", "AwqAoHfQuantizer", "attach_to_model", "register_with_transformers"]

#: ``quantization_config.quant_method`` of awq_ao checkpoints.
QUANT_METHOD = "awq_ao"


class AwqAoQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an awq_ao checkpoint as transformers holds it.

    It keeps every field of ``config.json``'s entry as it is (see
    :mod:`awq_ao.checkpoint.formats`), so ``save_pretrained`` writes it back unchanged. It only
    describes pre-quantized checkpoints: awq_ao quantizes with calibration data
    (:func:`awq_ao.quantize` or ``awq-ao quantize``), not inside ``from_pretrained``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("format", FORMAT_AWQ_AO)
        kwargs["quant_method"] = QUANT_METHOD
        self.__dict__.update(copy.deepcopy(kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The fields as written to ``config.json``."""
        return copy.deepcopy(self.__dict__)


def _checkpoint_dir(checkpoint_files: list[str] | None) -> Path:
    if not checkpoint_files:
        raise CheckpointError(
            "awq_ao checkpoints load from safetensors files; from_pretrained was given no checkpoint "
            "files (a state_dict argument is not supported): pass the checkpoint folder or hub id."
        )
    folders = {Path(f).parent for f in checkpoint_files}
    if len(folders) != 1 or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        raise CheckpointError(f"awq_ao checkpoints are safetensors shards in one folder; got {checkpoint_files}.")
    return folders.pop()


def _attr(key: str) -> str:
    return key.rpartition(".")[2]


def _meta_param(shards: ShardSet, key: str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shards.shape(key), dtype=shards.dtype(key), device="meta"), requires_grad=False)


def _stand_in(mod: nn.Module, attr: str, keys: tuple[str, ...]) -> None:
    """Remove the float parameter ``attr`` the codes replace. Where the codes have another name
    (format versions 1-2) a meta buffer outside the state dict keeps ``mod.<attr>`` readable
    for transformers' weight initialisation (a no-op on meta)."""
    p = mod._parameters.pop(attr, None)
    if p is not None and attr not in {_attr(k) for k in keys}:
        mod.register_buffer(attr, torch.empty_like(p, device="meta"), persistent=False)


class AwqAoHfQuantizer(HfQuantizer):
    """Builds awq_ao INT4 models inside ``PreTrainedModel.from_pretrained`` and writes them in
    ``save_pretrained`` (registered for ``quant_method: "awq_ao"`` on ``import awq_ao``)."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._plan: LoadPlan | None = None
        self._folder = Path()
        self._dtype: torch.dtype | None = None

    # ---- before loading -------------------------------------------------------------------------

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        """Refuse what the INT4 weights cannot do: offloading quantized layers to disk."""
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("awq_ao checkpoints cannot be offloaded to disk; use a device_map without 'disk'.")

    def preprocess_model(self, model: nn.Module, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        """Remember the model dtype, then let transformers call the hook below."""
        self._dtype = dtype
        super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Give each quantized module the checkpoint's parameters (codes, scale, zero) on meta.

        The plan is :func:`awq_ao.checkpoint.load` 's: every key's shape and dtype is checked
        against the shard headers before transformers reads any data.
        """
        from awq_ao.checkpoint import validate
        from awq_ao.checkpoint.load import _plan_awq_ao

        qc = self.quantization_config.to_dict()
        if qc.get("format", FORMAT_AWQ_AO) != FORMAT_AWQ_AO:
            raise CheckpointError(f"quant_method 'awq_ao' with format {qc.get('format')!r}; expected {FORMAT_AWQ_AO!r}.")
        folder = _checkpoint_dir(kwargs.get("checkpoint_files"))
        validate.check_config(folder, FORMAT_AWQ_AO, qc)  # the same checks as load_quantized's
        shards = ShardSet(folder)
        try:
            manifest = validate.check_manifest(folder, FORMAT_AWQ_AO, qc, shards)
            plan = _plan_awq_ao(qc, shards, model)
            validate.check_plan(folder, plan, manifest)
            for name, lp in plan.layers.items():
                mod = model.get_submodule(name)
                _stand_in(mod, "weight", lp.keys)
                for key in lp.keys:
                    mod._parameters[_attr(key)] = _meta_param(shards, key)
                if lp.scaled_input:
                    key = f"{name}.input_scale"
                    if key not in shards:
                        raise CheckpointError(f"{key} missing from the checkpoint ({name} is a ScaledInputLinear).")
                    mod.register_buffer("input_scale", torch.empty(shards.shape(key), dtype=shards.dtype(key), device="meta"))
            for key, ep in plan.experts.items():
                mod = model.get_submodule(key.rpartition(".")[0])
                _stand_in(mod, _attr(key), ep.keys)
                for k in ep.keys:
                    mod._parameters[_attr(k)] = _meta_param(shards, k)
        finally:
            shards.close()
        self._plan = plan
        self._folder = folder
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """Nothing is quantized while loading: the checkpoint holds the codes."""
        return False

    # ---- after loading --------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Turn each module's loaded codes, scale and zero into the INT4 weight its device reads."""
        from awq_ao.checkpoint import validate
        from awq_ao.checkpoint.load import (
            _make_experts,
            _use_int4_experts_implementation,
            quantized_linear,
        )

        plan = self._plan
        if plan is None:
            raise CheckpointError("awq_ao: weights loaded without the quantizer's preprocessing step.")
        for name, lp in plan.layers.items():
            old = model.get_submodule(name)
            data, scale, zero = (old._parameters[_attr(k)] for k in lp.keys)
            if data.device.type == "meta":
                raise CheckpointError(f"{name}: its quantized tensors were not loaded from the checkpoint.")
            if data.dim() == 3:  # byte codes are stored [N, K, 1]
                data = data.reshape(lp.out_features, lp.in_features)
            data, scale, zero = validate.check_quantized_tensors(self._folder, lp, data, scale, zero)
            dtype = self._dtype or scale.dtype
            bias = old._parameters.get("bias")
            input_scale = old._buffers.get("input_scale") if lp.scaled_input else None
            new = quantized_linear(lp, data, scale, zero, data.device, dtype, bias, input_scale)
            new.train(old.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        switched: dict[int, nn.Module] = {}
        for key, ep in plan.experts.items():
            mod = model.get_submodule(key.rpartition(".")[0])
            data, scale, zero = (mod._parameters.pop(_attr(k)) for k in ep.keys)
            if data.dim() == 4:
                data = data.reshape(ep.num_experts, ep.out_features, ep.in_features)
            data, scale, zero = validate.check_quantized_tensors(self._folder, ep, data, scale, zero)
            w = _make_experts(ep, data, scale, zero, data.device, self._dtype or scale.dtype)
            mod._buffers.pop(_attr(key), None)  # the stand-in of versions 1-2
            mod._parameters[_attr(key)] = nn.Parameter(w, requires_grad=False)
            switched[id(mod)] = mod
        for mod in switched.values():
            _use_int4_experts_implementation(mod)
        self._plan = None  # the shard readers' closures are not needed any more
        return model

    # ---- saving ---------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors of the awq_ao format for ``save_pretrained``; also refreshes
        ``model.config.quantization_config`` from the model as it is now."""
        from awq_ao.checkpoint.formats import find_quantized_experts, find_quantized_layers
        from awq_ao.checkpoint.save import (
            _awq_ao_config,
            _awq_ao_experts_tensors,
            _awq_ao_weight_tensors,
            _float_tensors,
        )

        layers = find_quantized_layers(model)
        experts = find_quantized_experts(model)
        items, _ = _float_tensors(model, layers, keep_aliases=False, experts=experts)
        state = dict(items)
        for layer in layers.values():
            state.update(_awq_ao_weight_tensors(layer))
        for qe in experts.values():
            state.update(_awq_ao_experts_tensors(qe))
        qc = _awq_ao_config(model, layers, {}, experts)
        self.quantization_config = AwqAoQuantizationConfig(**qc)
        model.config.quantization_config = self.quantization_config
        from awq_ao.checkpoint.validate import REWRITTEN_BY_KEY

        return state, {"awq_ao_format_version": str(FORMAT_VERSION), REWRITTEN_BY_KEY: "1"}

    def is_serializable(self, **kwargs: Any) -> bool:
        """``save_pretrained`` writes the awq_ao format. Called before transformers creates the
        folder: a model it cannot write (an 8-bit head) is refused here, with the reason."""
        ref = _MODELS.get(self)
        model = ref() if ref is not None else None
        if model is not None:
            from awq_ao.checkpoint.save_tensors import refuse_int8_head

            refuse_int8_head(model, "model.save_pretrained")
        return True

    @property
    def is_trainable(self) -> bool:
        """INT4 weights are frozen."""
        return False

    @property
    def is_compileable(self) -> bool:
        """The INT4 layers run under ``torch.compile``."""
        return True


def attach_to_model(model: nn.Module) -> bool:
    """Give a transformers model quantized in this process (``quantize_`` / :func:`awq_ao.quantize`)
    the quantizer that a loaded checkpoint gets, so ``model.save_pretrained(dir)`` writes the
    awq_ao format (the same tensors :func:`awq_ao.save_quantized` writes; only the
    ``.awq_ao-checkpoint`` marker and the overwrite safety are save_quantized's own).

    Returns:
        True if ``model`` is a transformers ``PreTrainedModel`` and now has the quantizer.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    if not isinstance(getattr(model, "hf_quantizer", None), AwqAoHfQuantizer):
        if getattr(model, "hf_quantizer", None) is not None:
            return False  # quantized by another method as well: leave its quantizer alone
        model.hf_quantizer = AwqAoHfQuantizer(AwqAoQuantizationConfig(), pre_quantized=True)
    remember_model(model)
    return True


def remember_model(model: nn.Module) -> None:
    """Let ``model``'s awq_ao quantizer see the model (weakly) when transformers asks whether it
    can be saved (:meth:`AwqAoHfQuantizer.is_serializable`)."""
    q = getattr(model, "hf_quantizer", None)
    if isinstance(q, AwqAoHfQuantizer):
        _MODELS[q] = weakref.ref(model)


#: quantizer -> its model (both weak: nothing is kept alive, the quantizer still pickles)
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_with_transformers() -> bool:
    """Register :class:`AwqAoQuantizationConfig` and :class:`AwqAoHfQuantizer` for
    ``quant_method: "awq_ao"`` (idempotent; done on ``import awq_ao``).

    Returns:
        True if this call registered them, False if they were registered already.
    """
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is AwqAoHfQuantizer:
        return False
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(AwqAoQuantizationConfig)
    register_quantizer(QUANT_METHOD)(AwqAoHfQuantizer)
    return True


# importing this module means transformers is loaded: make sure the method is registered
register_with_transformers()
