"""LoRA adapters on one device's shared weights: loaded on first use, held in an LRU, applied
per pipeline call.

Every worker on a device shares one copy of the weights (``from_pipe``), and LoRA layers live
inside those shared modules. So the adapters are per device, not per worker, and **one adapter
set is active per device at a time**: a call whose set differs from the active one waits until
the calls running with the active set end, then switches (``set_adapters``, a few attribute
writes) and runs. Calls with the active set run side by side as before. A per-worker copy of
the denoiser would let two sets run at once, but at the price of a second copy of the largest
module on the device, which is what sharing exists to avoid; and the engine batches equal sets
together, so switches are rare. Calls that cannot join wait in arrival order, and new arrivals
with the active set do not jump a call waiting for another set: a popular set cannot starve a
rare one.

Adapters stay unfused: diffusers' fuse/unfuse cycles drift, and an unfused switch costs only
``set_adapters``. Loading one (``load_lora_weights``) and dropping one (``delete_adapters``)
change the modules, so they happen only while no call runs on the device.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from diffuser_api.domain import AdapterSet
from diffuser_api.errors import Unavailable
from diffuser_api.models.spec import AdapterSpec

logger = logging.getLogger(__name__)

# A broken adapter file is not read again for every request.
ADAPTER_RETRY_AFTER_S = 5.0


class DeviceAdapters:
    """The adapters of one device's base pipeline; see the module docstring."""

    def __init__(self, pipeline: Any, adapters: Sequence[AdapterSpec], max_loaded: int, model_id: str) -> None:
        self._pipeline = pipeline
        self._specs = {adapter.name: adapter for adapter in adapters}
        self._max_loaded = max_loaded
        self._model_id = model_id
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._active: AdapterSet | None = ()  # None: unknown (a switch failed half-way)
        self._running = 0
        self._queue: deque[int] = deque()  # tickets of the calls waiting, first come first served
        self._tickets = itertools.count()
        self._turn = threading.Condition()
        # Read from the event loop (model details, memory budget) without taking the lock,
        # which a load holds: replaced whole, never changed in place.
        self.loaded_names: tuple[str, ...] = ()
        self.loaded_bytes = 0

    @contextlib.contextmanager
    def applied(self, wanted: AdapterSet) -> Iterator[None]:
        """Hold ``wanted`` active on the device for one pipeline call."""
        with self._turn:
            if self._queue or self._active != wanted:
                ticket = next(self._tickets)
                self._queue.append(ticket)
                try:
                    self._turn.wait_for(
                        lambda: self._queue[0] == ticket and (self._running == 0 or self._active == wanted)
                    )
                finally:
                    self._queue.remove(ticket)
                    self._turn.notify_all()
            if self._active != wanted:
                try:
                    self._switch(wanted)
                finally:
                    self._turn.notify_all()
            self._running += 1
        try:
            yield
        finally:
            with self._turn:
                self._running -= 1
                self._turn.notify_all()

    def _switch(self, wanted: AdapterSet) -> None:
        self._active = None
        names = [name for name, _ in wanted]
        for name in names:
            self._load(name, keep=names)
        if wanted:
            self._pipeline.enable_lora()
            self._pipeline.set_adapters(names, adapter_weights=[scale for _, scale in wanted])
        elif self._loaded:
            self._pipeline.disable_lora()
        self._active = wanted

    def _load(self, name: str, keep: Sequence[str]) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        for old in [old for old in self._loaded if old not in keep][: max(0, len(self._loaded) + 1 - self._max_loaded)]:
            self._pipeline.delete_adapters(old)
            del self._loaded[old]
            logger.info("LoRA adapter %s of %s unloaded (least recently used)", old, self._model_id)
        spec = self._specs[name]
        try:
            self._pipeline.load_lora_weights(spec.source, weight_name=spec.weight_name, adapter_name=name)
        except Exception:  # a bad adapter must leave the model serving without it
            # The log alone has the reason: exception text names paths and library internals.
            logger.exception("loading LoRA adapter %s of %s failed", name, self._model_id)
            self._forget_partial(name)
            self._publish()
            raise Unavailable(
                f"LoRA adapter '{name}' of model '{self._model_id}' could not be loaded; the server's log says why",
                retry_after=ADAPTER_RETRY_AFTER_S,
            ) from None
        self._loaded[name] = self._bytes_of(name)
        self._publish()
        logger.info("LoRA adapter %s of %s loaded (%d bytes)", name, self._model_id, self._loaded[name])

    def _forget_partial(self, name: str) -> None:
        """A load that failed half-way may have added layers under the name: drop them."""
        present = {adapter for names in self._pipeline.get_list_adapters().values() for adapter in names}
        if name in present:
            self._pipeline.delete_adapters(name)

    def _bytes_of(self, name: str) -> int:
        """Parameters peft added under the adapter's name (``...lora_A.<name>.weight``)."""
        total = 0
        for component in self._pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                for parameter_name, parameter in component.named_parameters():
                    parts = parameter_name.split(".")
                    if name in parts and any(part.startswith("lora_") for part in parts):
                        total += parameter.numel() * parameter.element_size()
        return total

    def _publish(self) -> None:
        self.loaded_names = tuple(self._loaded)
        self.loaded_bytes = sum(self._loaded.values())
