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
         past_k.{l}, past_v.{l} (B, nh, P, hs) and cross_k.{l}, cross_v.{l} (B, nh, S, hs) for each decoder layer
         l, src_mask (B, S) bool
    out: logits (B, V), present_k.{l}, present_v.{l} (B, nh, P+1, hs)
         [attn] dec_self_attn (L, B, nh, 1, P+1), cross_attn (L, B, nh, 1, S)

The caches go in and out one tensor per layer: stacked, every step would copy each layer's cache out of one
tensor and every present into another (39% of an int8 opus-mt step at batch 16, 60 tokens in, by ORT's profiler).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from model_repository import graph_inputs, graph_outputs
from model_src.model import Seq2SeqTransformer

log = logging.getLogger(__name__)





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

    def forward(self, input_ids, positions, self_mask, past_k: list[Tensor], past_v: list[Tensor],
                cross_k: list[Tensor], cross_v: list[Tensor], src_mask):
        o = self.m.decode_step(input_ids, positions, self_mask, past_k, past_v, cross_k, cross_v, src_mask,
                               stacked=False)
        out = (o.logits, *o.present_k, *o.present_v)  # flat, in graph_outputs order
        return out if not self.with_attention else (*out, o.self_attn, o.cross_attn)


def example_inputs(model: Seq2SeqTransformer, B: int = 2, S: int = 5, P: int = 3):
    """Tracing inputs; sizes are distinct and > 1 so that no dynamic axis is specialised to a constant."""
    cfg = model.config
    src_ids = torch.randint(4, cfg.src_vocab_size, (B, S))
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, -1] = False
    L, nh, hs = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim
    enc = (src_ids, src_mask)
    def layers(T: int) -> list[Tensor]:
        return [torch.randn(B, nh, T, hs) for _ in range(L)]  # L x (B, nh, T, hs)

    dec = (torch.randint(4, cfg.tgt_vocab_size, (B,)), torch.full((B,), P), torch.ones(B, P + 1, dtype=torch.bool),
           layers(P), layers(P), layers(S), layers(S), src_mask)
    return enc, dec


def _dynamic_shapes(kind: str, n_layers: int):
    from torch.export import Dim

    B, S = Dim("batch", min=1, max=1024), Dim("src_len", min=1, max=4096)
    if kind == "encoder":
        return {"src_ids": {0: B, 1: S}, "src_mask": {0: B, 1: S}}
    P = Dim("past_len", min=0, max=4096)
    cache, cross = [{0: B, 2: P}] * n_layers, [{0: B, 2: S}] * n_layers  # per layer (B, nh, T, hs)
    return {"input_ids": {0: B}, "positions": {0: B}, "self_mask": {0: B, 1: P + 1}, "past_k": cache,
            "past_v": cache, "cross_k": cross, "cross_v": cross, "src_mask": {0: B, 1: S}}


def export_graph(model: Seq2SeqTransformer, name: str, path: Path, opset: int) -> None:
    """Export one graph with torch.onnx's dynamo exporter; node scopes keep each attention block findable."""
    L = model.config.n_decoder_layers
    kind = "encoder" if name.startswith("encoder") else "decoder"
    wrapper = (EncoderGraph if kind == "encoder" else DecoderGraph)(model, name.endswith("_attn"))
    wrapper.eval()  # the wrapper itself, not only the inner model
    enc_in, dec_in = example_inputs(model)
    args = enc_in if kind == "encoder" else dec_in
    # The exporter logs a warning per missing optional torchvision op on every export; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                    input_names=list(graph_inputs(name, L)), output_names=list(graph_outputs(name, L)),
                                    dynamic_shapes=_dynamic_shapes(kind, L),
                                    optimize=True, verbose=False)
    program.save(str(path), external_data=False)
