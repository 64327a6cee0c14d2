"""Find every multi-head attention block in an exported graph, by the module scope the exporter records per node.

The dynamo exporter stamps each node with `pkg.torch.onnx.name_scopes`, e.g.
`['', 'm.decoder.1', 'm.decoder.1.cross_attn', 'softmax_3']`. Every block's softmax (the node whose output is
that block's per-head probabilities, shape (B, nh, Tq, Tk)) is renamed `<block>/softmax` and tagged with
`attnserve.attention_block`, so tools such as Netron show the block by name.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass

import onnx

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
BLOCK_KEY = "attnserve.attention_block"
_SCOPE = re.compile(r"^m\.(encoder|decoder)\.(\d+)\.(self_attn|cross_attn)$")
KINDS = {("encoder", "self_attn"): "encoder_self", ("decoder", "self_attn"): "decoder_self",
         ("decoder", "cross_attn"): "cross"}
# The graph output that carries each kind's probabilities, stacked over layers: (layers, B, nh, Tq, Tk).
KIND_OUTPUT = {"encoder_self": "enc_self_attn", "decoder_self": "dec_self_attn", "cross": "cross_attn"}


@dataclass(frozen=True)
class AttentionBlock:
    graph: str
    block: str  # e.g. decoder.1.cross_attn
    layer: int
    kind: str  # encoder_self | decoder_self | cross
    heads: int
    head_dim: int
    node: str
    probabilities_output: str | None  # graph output holding this block's probabilities, None in fast graphs

    def to_dict(self) -> dict:
        return asdict(self)


def _scope_of(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == BLOCK_KEY:
            return prop.value
        if prop.key == SCOPE_KEY:
            for scope in reversed(ast.literal_eval(prop.value)):
                if _SCOPE.match(scope):
                    return scope[2:]  # drop the wrapper's "m."
    return None


def _heads(model: onnx.ModelProto, tensor: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[1].dim_value:
                return dims[1].dim_value
    return None


def find_blocks(model: onnx.ModelProto, graph: str, head_dim: int | None = None) -> list[AttentionBlock]:
    """Every attention block of `model`, in graph order; heads are read from the graph's own shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    outputs = {o.name for o in model.graph.output}
    blocks = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        scope = _scope_of(node)
        m = _SCOPE.match("m." + scope) if scope else None
        if not m:
            continue
        stack, layer, attn = m.group(1), int(m.group(2)), m.group(3)
        kind = KINDS[(stack, attn)]
        heads = _heads(inferred, node.output[0])
        out = KIND_OUTPUT[kind]
        blocks.append(AttentionBlock(graph, scope, layer, kind, heads or 0, head_dim or 0, node.name,
                                     out if out in outputs else None))
    return blocks


def tag_blocks(model: onnx.ModelProto) -> int:
    """Rename each block's softmax node `<block>/softmax` and tag it; returns how many were tagged."""
    n = 0
    for node in model.graph.node:
        scope = _scope_of(node) if node.op_type == "Softmax" else None
        if scope and _SCOPE.match("m." + scope):
            node.name = f"{scope}/softmax"
            if not any(p.key == BLOCK_KEY for p in node.metadata_props):
                node.metadata_props.add(key=BLOCK_KEY, value=scope)
            n += 1
    return n


def expected_blocks(model_config: dict, graph: str) -> int:
    if graph.startswith("encoder"):
        return model_config["n_encoder_layers"]
    return 2 * model_config["n_decoder_layers"]
