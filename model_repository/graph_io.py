"""The graphs' inputs and outputs: the contract between export (which writes these names) and serving (which
feeds and reads them).

The decoder step takes and gives its caches one tensor per layer (`past_k.0` ... `past_k.{L-1}`, `present_k.0`
..., `cross_k.0` ...), so that no step copies every layer's cache into one stacked tensor and out again. Callers
speak of a cache as one value: a stacked (L, ...) array or a sequence of L per-layer arrays (anything indexable by
layer); `flat_feeds` and `grouped` turn that into the graph's names and back.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

GRAPH_NAMES = ("encoder", "encoder_attn", "decoder", "decoder_attn")
ENCODER_INPUTS = ("src_ids", "src_mask")
# The decoder's inputs in graph order; the ones in PER_LAYER are one input per decoder layer.
DECODER_INPUTS = ("input_ids", "positions", "self_mask", "past_k", "past_v", "cross_k", "cross_v", "src_mask")
PER_LAYER = frozenset({"past_k", "past_v", "cross_k", "cross_v", "present_k", "present_v"})
_OUTPUTS = {
    "encoder": ("cross_k", "cross_v"),
    "encoder_attn": ("cross_k", "cross_v", "enc_self_attn", "embeddings", "hidden_states"),
    "decoder": ("logits", "present_k", "present_v"),
    "decoder_attn": ("logits", "present_k", "present_v", "dec_self_attn", "cross_attn"),
}


def _expand(graph: str, names: Sequence[str], n_layers: int) -> tuple[str, ...]:
    if graph.startswith("encoder"):  # the encoder gives cross_k/v stacked (L, B, nh, S, hs): one copy per request
        return tuple(names)
    return tuple(f"{n}.{i}" if n in PER_LAYER else n for n in names for i in (range(n_layers) if n in PER_LAYER
                                                                             else (0,)))


def graph_inputs(graph: str, n_layers: int) -> tuple[str, ...]:
    """The input names of `graph` for a model with `n_layers` decoder layers, in graph order."""
    return _expand(graph, ENCODER_INPUTS if graph.startswith("encoder") else DECODER_INPUTS, n_layers)


def graph_outputs(graph: str, n_layers: int) -> tuple[str, ...]:
    return _expand(graph, _OUTPUTS[graph], n_layers)


@functools.lru_cache(maxsize=1024)  # read for every input and output of every decoder step: parsed once per name
def base_name(name: str) -> tuple[str, int | None]:
    """`present_k.3` -> ("present_k", 3); `logits` -> ("logits", None)."""
    base, _, layer = name.rpartition(".")
    if base in PER_LAYER and layer.isdecimal():
        return base, int(layer)
    return name, None


def flat_feeds(names: Sequence[str], feeds: Mapping[str, Any]) -> dict[str, Any]:
    """The feeds for a graph that declares `names`: `past_k.3` is layer 3 of `feeds["past_k"]`. Only the
    declared names are fed (export drops inputs a graph does not use)."""
    out = {}
    for name in names:
        base, layer = base_name(name)
        out[name] = feeds[base] if layer is None else feeds[base][layer]
    return out


def grouped(names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """A run's outputs by name, the per-layer ones gathered into one tuple: `present_k` -> (layer 0, 1, ...)."""
    out: dict[str, Any] = {}
    layers: dict[str, list] = {}
    for name, value in zip(names, values, strict=True):
        base, layer = base_name(name)
        if layer is None:
            out[name] = value
        else:
            layers.setdefault(base, []).append((layer, value))
    for base, items in layers.items():
        out[base] = tuple(v for _, v in sorted(items, key=lambda item: item[0]))
    return out
