"""Decoder steps through ONNX Runtime's IO binding, so a model's state stays where the model runs.

On CUDA, `run()` on numpy would copy every layer's cache host -> device -> host at every step. Bound, the present
keys/values of one step stay on the device as OrtValues and go back in as the next step's past; a request's cross
keys/values go to the device once (per batch of sources) and stay there; only the logits and the attention asked
for come to the host. On CPU the same path runs with every OrtValue wrapping numpy memory (no copies), which is
how the tests exercise it.

The engine's rows treat a cache held in OrtValues like any other: a steady batch feeds them back as they are, and
a batch that changes (a row joins, leaves or a beam reorders) brings that step's caches to the host once
(`feeds.host_layers`) to trim and gather them there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from model_repository.graph_io import base_name

DEVICE_OUTPUTS = frozenset({"present_k", "present_v"})  # outputs that stay on the device: the next step's inputs
RESIDENT = ("cross_k", "cross_v")  # inputs that do not change while a request decodes: sent to the device once


class ResidentSources:
    """Device copies of the sources' cross keys/values, by the identity of the host value the engine feeds (a
    row's own stacked array, or the padded batch its `SourceBatch` keeps while the rows stay the same). Bounded:
    the oldest go when more batches of sources are live than it keeps."""

    def __init__(self, device: str, keep: int = 32) -> None:
        self.device, self.keep = device, keep
        self._cache: OrderedDict[int, tuple[Any, tuple[ort.OrtValue, ...]]] = OrderedDict()
        self._lock = threading.Lock()  # engine workers share it
        self.copies = 0  # batches of sources sent to the device

    def __call__(self, value: Sequence[np.ndarray]) -> tuple[ort.OrtValue, ...]:
        with self._lock:
            hit = self._cache.get(id(value))
            if hit is not None and hit[0] is value:  # the same object, alive (held here): the same data
                self._cache.move_to_end(id(value))
                return hit[1]
        on_device = tuple(_ortvalue(layer, self.device) for layer in value)
        with self._lock:
            self._cache[id(value)] = (value, on_device)
            self.copies += 1
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return on_device


def _ortvalue(value: Any, device: str) -> ort.OrtValue:
    if isinstance(value, ort.OrtValue):
        return value
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)


def run_bound(session: ort.InferenceSession, inputs: Sequence[str], outputs: Sequence[str], feeds: dict,
              device: str, sources: ResidentSources) -> list:
    """One run with IO binding. `feeds` by the contract's names (a per-layer cache as a sequence of layers, as
    numpy arrays or OrtValues); returns the outputs in `outputs` order: the present keys/values as OrtValues on
    `device`, everything else as numpy."""
    binding = session.io_binding()
    resident = {name: sources(feeds[name]) for name in RESIDENT if name in feeds}
    for name in inputs:
        base, layer = base_name(name)
        value = (resident if base in resident else feeds)[base]
        binding.bind_ortvalue_input(name, _ortvalue(value if layer is None else value[layer], device))
    for name in outputs:
        binding.bind_output(name, device if base_name(name)[0] in DEVICE_OUTPUTS else "cpu")
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    return [v if base_name(n)[0] in DEVICE_OUTPUTS else v.numpy() for n, v in zip(outputs, values, strict=True)]
