"""One copy of every weight: the graphs of a version keep their structure in their own files and their tensors in
one shared `weights.bin`, each distinct tensor stored once (the fast and `_attn` graphs, and the encoder and decoder,
hold the same matrices: the tied embedding alone is 119 MB at opus-mt's size).

Every tensor starts at a multiple of 4096 bytes, so ONNX Runtime maps it from the file instead of reading it: the
sessions of a version share those pages, and a table that is only gathered from (an embedding) is resident only
for the rows that are used. Matrices that a MatMul prepacks become each session's own copy (ORT's choice), which
is why serving keeps few sessions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # the page size: ORT maps external data whose offset is a multiple of it
INLINE_BELOW = 1024  # bytes: small constants stay inside their graph


@dataclass(frozen=True)
class SharingReport:
    file: str
    bytes_written: int  # the weights file's size
    bytes_referenced: int  # what the graphs would hold if each kept its own copy

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes_written, "bytes_referenced": self.bytes_referenced}


def _external(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_weights(paths: dict[str, Path], folder: Path) -> SharingReport:
    """Rewrite every graph in `paths` (files in `folder`) so its large tensors live in `folder/weights.bin`, each
    distinct tensor once; returns what was written. The graphs are saved in place, structure only."""
    out = Path(folder) / WEIGHTS_FILE
    offsets: dict[str, tuple[int, int]] = {}  # content digest -> (offset, length)
    referenced = 0
    with open(out, "wb") as f:
        for path in paths.values():
            model = onnx.load(str(path))
            for tensor in model.graph.initializer:
                # raw_data as stored: packed 4-bit tensors must stay packed (to_array would unpack them)
                data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(data) < INLINE_BELOW:
                    continue
                referenced += len(data)
                digest = hashlib.sha256(f"{tensor.data_type}{list(tensor.dims)}".encode() + data).hexdigest()
                if digest not in offsets:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    offsets[digest] = (f.tell(), len(data))
                    f.write(data)
                _external(tensor, *offsets[digest])
            onnx.save(model, str(path))
    return SharingReport(WEIGHTS_FILE, out.stat().st_size, referenced)
