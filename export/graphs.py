"""The four exported graphs: encoder and decoder step, each in a fast variant and one that also returns attention.

ONNX Runtime computes every output of a graph on every run, so only the `_attn` graphs carry attention
probabilities; a request that does not ask for attention runs the fast graphs and never pays for them.

Graph signatures (L = decoder layers, E = encoder layers, nh heads, hs head dim, B batch, S source length,
P past length; every one of B, S and P is dynamic, P = 0 included):

encoder / encoder_attn
    in : src_ids (B, S) int64, src_mask (B, S) bool (True on real tokens)
    out: cross_k, cross_v (L, B, nh, S, hs)
         [attn] enc_self_attn (E, B, nh, S, S), embeddings (B, S, C) static token vectors,
                hidden_states (E, B, S, C) contextual vectors after each encoder layer
decoder / decoder_attn
    in : input_ids (B,) int64 previous token, positions (B,) int64, self_mask (B, P+1) bool,
         past_k, past_v (L, B, nh, P, hs), cross_k, cross_v (L, B, nh, S, hs), src_mask (B, S) bool
    out: logits (B, V), present_k, present_v (L, B, nh, P+1, hs)
         [attn] dec_self_attn (L, B, nh, 1, P+1), cross_attn (L, B, nh, 1, S)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model_repository import GRAPH_INPUTS, GRAPH_NAMES, GRAPH_OUTPUTS
from model_src.model import Seq2SeqTransformer

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: encoder, encoder_attn, decoder, decoder_attn
    inputs: list[str]
    outputs: list[str]


GRAPHS = {name: GraphSpec(name, list(GRAPH_INPUTS[name]), list(GRAPH_OUTPUTS[name])) for name in GRAPH_NAMES}


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2SeqTransformer, with_attention: bool) -> None:
        super().__init__()
        self.m = model
        self.with_attention = with_attention

    def forward(self, src_ids: Tensor, src_mask: Tensor):
        out, hidden = self.m.encode(src_ids, src_mask, return_hidden=True)
        if not self.with_attention:
            return out.cross_k, out.cross_v
        return out.cross_k, out.cross_v, out.self_attn, self.m.embed_source(src_ids), torch.stack(hidden)


class DecoderGraph(nn.Module):
    def __init__(self, model: Seq2SeqTransformer, with_attention: bool) -> None:
        super().__init__()
        self.m = model
        self.with_attention = with_attention

    def forward(self, input_ids, positions, self_mask, past_k, past_v, cross_k, cross_v, src_mask):
        o = self.m.decode_step(input_ids, positions, self_mask, past_k, past_v, cross_k, cross_v, src_mask)
        if not self.with_attention:
            return o.logits, o.present_k, o.present_v
        return o.logits, o.present_k, o.present_v, o.self_attn, o.cross_attn


def example_inputs(model: Seq2SeqTransformer, B: int = 2, S: int = 5, P: int = 3):
    """Tracing inputs; sizes are distinct and > 1 so that no dynamic axis is specialised to a constant."""
    cfg = model.config
    src_ids = torch.randint(4, cfg.src_vocab_size, (B, S))
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, -1] = False
    L, nh, hs = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim
    enc = (src_ids, src_mask)
    dec = (torch.randint(4, cfg.tgt_vocab_size, (B,)), torch.full((B,), P), torch.ones(B, P + 1, dtype=torch.bool),
           torch.randn(L, B, nh, P, hs), torch.randn(L, B, nh, P, hs), torch.randn(L, B, nh, S, hs),
           torch.randn(L, B, nh, S, hs), src_mask)
    return enc, dec


def _dynamic_shapes(kind: str):
    from torch.export import Dim

    B, S = Dim("batch", min=1, max=1024), Dim("src_len", min=1, max=4096)
    if kind == "encoder":
        return {"src_ids": {0: B, 1: S}, "src_mask": {0: B, 1: S}}
    P = Dim("past_len", min=0, max=4096)
    cache = {1: B, 3: P}
    return {"input_ids": {0: B}, "positions": {0: B}, "self_mask": {0: B, 1: P + 1}, "past_k": cache,
            "past_v": cache, "cross_k": {1: B, 3: S}, "cross_v": {1: B, 3: S}, "src_mask": {0: B, 1: S}}


def export_graph(model: Seq2SeqTransformer, name: str, path: Path, opset: int) -> None:
    """Export one graph with torch.onnx's dynamo exporter; node scopes keep each attention block findable."""
    spec = GRAPHS[name]
    kind = "encoder" if name.startswith("encoder") else "decoder"
    wrapper = (EncoderGraph if kind == "encoder" else DecoderGraph)(model, name.endswith("_attn"))
    wrapper.eval()  # the wrapper itself, not only the inner model
    enc_in, dec_in = example_inputs(model)
    args = enc_in if kind == "encoder" else dec_in
    # The exporter logs a warning per missing optional torchvision op on every export; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=spec.inputs,
                                    output_names=spec.outputs, dynamic_shapes=_dynamic_shapes(kind),
                                    optimize=True, verbose=False)
    program.save(str(path), external_data=False)
