"""LoRA adapters on a compiled denoiser: diffusers' hot-swap, so switching adapters never recompiles.

A compiled graph bakes in which LoRA layers exist, which adapters are active and (unless they
are tensors) their scales; ``set_adapters`` and ``load_lora_weights`` change all three, so every
switch would recompile. Hot-swap keeps the graph fixed:

- The denoiser holds a fixed number of **slots** (peft adapters named ``slot-0``...), one per
  adapter a request may name (``DIFFUSER_MAX_LORAS_PER_REQUEST``, at most the registered
  adapters). They are injected before compiling, padded to the largest rank of the registered
  adapters (``enable_lora_hotswap(target_rank=...)``), and stay active forever.
- A request's adapter set is applied by writing each slot's scale in place (the scalings are
  tensors after ``enable_lora_hotswap``): the adapter's own ``alpha / rank`` times the
  request's scale, and 0 for slots the set does not use (so no set is the base image).
- An adapter not in a slot is loaded with ``load_lora_weights(..., hotswap=True)`` into a slot
  the set does not use, the least recently used one: the slots are the model's LRU of loaded
  adapters. Its weights are copied into the slot's tensors, so the graph does not change.

What hot-swap cannot do is refused at start-up (``plan_hot_swap``), not paid for later with a
recompilation: an adapter with text-encoder layers (diffusers cannot hot-swap those), adapters
whose layers no single adapter covers (a slot has the layers of the adapter first loaded into
it; a swapped-in adapter may leave some of them at zero but cannot add new ones), and adapters
whose peft configurations differ where peft requires them equal (alpha patterns, DoRA, rsLoRA).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import check_hotswap_configs_compatible

from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import AdapterSet
from diffuser_api.errors import Unavailable
from diffuser_api.models.adapters import ADAPTER_RETRY_AFTER_S, DeviceAdapters
from diffuser_api.models.spec import AdapterSpec

logger = logging.getLogger(__name__)

_PROBE = "hotswap-probe"


@dataclass(frozen=True)
class HotSwapPlan:
    """How the slots are built: loaded first with ``covering`` (its layers include every
    adapter's), padded to ``target_rank`` (the largest rank of any adapter's layer)."""

    covering: AdapterSpec
    target_rank: int
    slots: int


@dataclass(frozen=True)
class _AdapterShape:
    layers: dict[str, int]  # denoiser module -> rank
    config: Any  # the peft LoraConfig diffusers built for it
    other_components: tuple[str, ...]  # components besides the denoiser it has layers in


def denoiser_of(pipeline: Any) -> tuple[str, Any]:
    for name in ("transformer", "unet"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return name, module
    raise ValueError(f"{type(pipeline).__name__} has neither a transformer nor a UNet")


def plan_hot_swap(pipeline: Any, adapters: Sequence[AdapterSpec], slots: int, model_id: str) -> HotSwapPlan:
    """Load each adapter once (then drop it) to learn its layers, ranks and configuration, and
    refuse with a models-file error what hot-swap cannot serve. Runs before compilation."""
    shapes = {adapter.name: _probe(pipeline, adapter, model_id) for adapter in adapters}
    for name, shape in shapes.items():
        if shape.other_components:
            raise ModelsFileError(
                f"model '{model_id}': LoRA adapter '{name}' has layers in {', '.join(shape.other_components)}; "
                "with speed.compile adapters are hot-swapped, which diffusers supports in the denoiser only: "
                "remove the adapter or the compile option"
            )
    union = set().union(*(shape.layers for shape in shapes.values()))
    covering = next((name for name, shape in shapes.items() if set(shape.layers) == union), None)
    if covering is None:
        first, second = _two_that_differ(shapes)
        raise ModelsFileError(
            f"model '{model_id}': with speed.compile, LoRA adapters are hot-swapped into fixed layers, and no "
            f"adapter targets the layers of all others ('{first}' and '{second}' target different layers, "
            f"e.g. '{sorted(set(shapes[second].layers) - set(shapes[first].layers))[0]}'); serve them from "
            "separate models or remove the compile option"
        )
    for name, shape in shapes.items():
        try:
            check_hotswap_configs_compatible(shapes[covering].config, shape.config)
        except ValueError:
            raise ModelsFileError(
                f"model '{model_id}': with speed.compile, LoRA adapters '{covering}' and '{name}' cannot be "
                "hot-swapped for each other (their LoRA configurations differ: alpha pattern, DoRA or rsLoRA); "
                "serve them from separate models or remove the compile option"
            ) from None
    target_rank = max(rank for shape in shapes.values() for rank in shape.layers.values())
    by_name = {adapter.name: adapter for adapter in adapters}
    return HotSwapPlan(covering=by_name[covering], target_rank=target_rank, slots=slots)


def _two_that_differ(shapes: dict[str, _AdapterShape]) -> tuple[str, str]:
    names = list(shapes)
    for first in names:
        for second in names:
            if set(shapes[second].layers) - set(shapes[first].layers):
                return first, second
    raise ValueError("every adapter's layers are covered")


def _probe(pipeline: Any, adapter: AdapterSpec, model_id: str) -> _AdapterShape:
    denoiser_name, denoiser = denoiser_of(pipeline)
    try:
        pipeline.load_lora_weights(adapter.source, weight_name=adapter.weight_name, adapter_name=_PROBE)
    except Exception:  # any reason an adapter cannot load: refused at start-up, the log has it
        logger.exception("loading LoRA adapter %s of %s to plan its hot-swap failed", adapter.name, model_id)
        raise ModelsFileError(
            f"model '{model_id}': LoRA adapter '{adapter.name}' could not be loaded, and with speed.compile every "
            "adapter is checked at start-up (hot-swap needs their layers and ranks); the server's log says why"
        ) from None
    try:
        components = pipeline.get_list_adapters()
        layers = {
            name: module.lora_A[_PROBE].weight.shape[0]
            for name, module in denoiser.named_modules()
            if isinstance(module, LoraLayer) and _PROBE in module.lora_A
        }
        config = copy.deepcopy(denoiser.peft_config[_PROBE]) if _PROBE in getattr(denoiser, "peft_config", {}) else None
        others = tuple(sorted(name for name, names in components.items() if _PROBE in names and name != denoiser_name))
    finally:
        pipeline.delete_adapters(_PROBE)
    if not layers or config is None:
        raise ModelsFileError(f"model '{model_id}': LoRA adapter '{adapter.name}' has no layers in the {denoiser_name}")
    return _AdapterShape(layers, config, others)


class HotSwapAdapters(DeviceAdapters):
    """``DeviceAdapters`` whose switches write slot scales and hot-swap weights in place (see
    the module docstring); the turn-taking of one adapter set per device is the same."""

    def __init__(self, pipeline: Any, adapters: Sequence[AdapterSpec], plan: HotSwapPlan, model_id: str) -> None:
        super().__init__(pipeline, adapters, plan.slots, model_id)
        _, self._denoiser = denoiser_of(pipeline)
        self._slot_names = [f"slot-{index}" for index in range(plan.slots)]
        for slot in self._slot_names:
            # Before each slot's first load: diffusers pads and turns scalings into tensors
            # only for the first adapter loaded after this call.
            pipeline.enable_lora_hotswap(target_rank=plan.target_rank, check_compiled="ignore")
            pipeline.load_lora_weights(plan.covering.source, weight_name=plan.covering.weight_name, adapter_name=slot)
        self._denoiser.set_adapter(self._slot_names)  # all slots active for good; unused ones at scale 0
        self._layers = [module for module in self._denoiser.modules() if isinstance(module, LoraLayer)]
        # Slot -> the adapter in it (least recently used first); None: its weights mean nothing.
        # Slot 0 holds the covering adapter's weights from the start; the others are copies.
        self._slots: OrderedDict[str, str | None] = OrderedDict((slot, None) for slot in self._slot_names[1:])
        self._slots[self._slot_names[0]] = plan.covering.name
        self._unit_scalings: dict[str, list[torch.Tensor]] = {}
        for slot in self._slot_names:
            self._remember_unit_scalings(slot)
        self._slot_bytes = sum(self._bytes_of(slot) for slot in self._slot_names)
        self._write_scales(())
        self._publish_slots()

    def _switch(self, wanted: AdapterSet) -> None:
        self._active = None
        names = [name for name, _ in wanted]
        for name in names:
            self._place(name, keep=names)
        self._write_scales(wanted)
        self._active = wanted

    def _place(self, name: str, keep: Sequence[str]) -> None:
        held = next((slot for slot, adapter in self._slots.items() if adapter == name), None)
        if held is not None:
            self._slots.move_to_end(held)
            return
        slot = next(slot for slot, adapter in self._slots.items() if adapter not in keep)
        evicted = self._slots[slot]
        self._slots[slot] = None  # a swap that fails half-way leaves the slot's weights meaningless
        spec = self._specs[name]
        try:
            self._pipeline.load_lora_weights(spec.source, weight_name=spec.weight_name, adapter_name=slot, hotswap=True)
        except Exception:  # a bad adapter must leave the model serving without it
            logger.exception("hot-swapping LoRA adapter %s of %s into %s failed", name, self._model_id, slot)
            self._publish_slots()
            raise Unavailable(
                f"LoRA adapter '{name}' of model '{self._model_id}' could not be loaded; the server's log says why",
                retry_after=ADAPTER_RETRY_AFTER_S,
            ) from None
        self._slots[slot] = name
        self._slots.move_to_end(slot)
        self._remember_unit_scalings(slot)
        self._publish_slots()
        if evicted is not None:
            logger.info("LoRA adapter %s of %s unloaded (least recently used)", evicted, self._model_id)
        logger.info("LoRA adapter %s of %s hot-swapped into %s", name, self._model_id, slot)

    def _remember_unit_scalings(self, slot: str) -> None:
        """Each layer's ``alpha / rank`` for the adapter now in ``slot`` (a hot-swap writes
        them), which a request's scale multiplies."""
        self._unit_scalings[slot] = [torch.as_tensor(layer.scaling[slot]).clone() for layer in self._layers]

    def _write_scales(self, wanted: AdapterSet) -> None:
        """In place, so the compiled graph reads the new values without a recompilation."""
        scales = dict(wanted)
        for slot, adapter in self._slots.items():
            scale = scales.get(adapter, 0.0) if adapter is not None else 0.0
            for layer, unit in zip(self._layers, self._unit_scalings[slot], strict=True):
                layer.scaling[slot].copy_(unit * scale)

    def _publish_slots(self) -> None:
        self.loaded_names = tuple(adapter for adapter in self._slots.values() if adapter is not None)
        self.loaded_bytes = self._slot_bytes  # the slots hold their memory whatever is in them
