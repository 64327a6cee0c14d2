"""Quantized graphs: int8 (dynamic, fused int8 GEMMs) and int4 (weight-only blocks), the output projection included.

Why these two, measured on the opus-mt shape's decoder step (one intra-op thread, ONNX Runtime 1.32, AVX2 without
VNNI, past 16, BENCHMARKS.md has the table): the earlier `quantize_dynamic` over every op was slower than fp32
(13.4 / 45.6 ms at batch 1 / 16 against 11.8 / 32.0) because it quantized the tied embedding's Gather, so the
output projection `MatMul(x, Transpose(table))` dequantized the whole 58,101 x 512 table at every step (34% of the
step) and then ran an fp32 MatMul on an unpacked matrix (46%). Untying the projection into its own constant and
quantizing MatMuls only gives ONNX Runtime's fused `DynamicQuantizeMatMul` everywhere: 3.5 / 16.4 ms. Weight-only
`MatMulNBits` (accuracy level 4) was 5.4 / 38.5 ms at 8 bits and 3.0 / 26.7 ms at 4 bits: int8 keeps the dynamic
scheme; int4 uses `MatMulNBits` and block-quantized Gathers, for the smallest files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
BLOCK = 32  # int4 block size along the reduction axis: one fp32 scale per 32 weights


class _QuietRoot(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def untie_output_projection(model: onnx.ModelProto) -> int:
    """Replace `Transpose(constant)` feeding a MatMul by the transposed constant itself, so quantizers (which take a
    MatMul only when its weight is an initializer) reach the tied output projection. Returns how many were untied."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    untied = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        if not all(c.op_type == "MatMul" and c.input[1] == node.output[0] for c in consumers.get(node.output[0], [])):
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])  # (V, C) as the embedding stores it
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), node.output[0]))  # (C, V)
        graph.node.remove(node)
        untied += 1
    return untied


def quantize_graph(source: Path, target: Path, scheme: str) -> None:
    """Write the `scheme` version of the graph at `source` to `target` (both single-file ONNX models)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; use one of {', '.join(SCHEMES)}")
    model = onnx.load(str(source))
    untied = untie_output_projection(model)
    log.info("%s: %d tied projection(s) untied for quantization", source.name, untied)
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        untied_path = target.with_suffix(".untied.onnx")
        onnx.save(model, str(untied_path))
        quiet = _QuietRoot()  # it logs "consider pre-processing" on the root logger for every graph
        try:  # MatMuls only: a quantized Gather table would be dequantized whole wherever else it is read
            logging.getLogger().addFilter(quiet)
            quantize_dynamic(str(untied_path), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"])
        finally:
            logging.getLogger().removeFilter(quiet)
            untied_path.unlink(missing_ok=True)
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4, bits=4,
                                          op_types_to_quantize=("MatMul", "Gather"))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))
