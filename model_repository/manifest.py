"""A version's manifest, typed: read, checked field by field and against the folder it describes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from .graph_io import GRAPH_NAMES
from .layout import FORMAT_VERSION, MANIFEST, MAX_VERSION, VersionError, contained, parse_version, sha256_file

BLOCK_KINDS = ("encoder_self", "decoder_self", "cross")
_MISSING: Any = object()
_SHA256 = frozenset("0123456789abcdef")


def _show(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kind = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


class _Reader:
    """Takes typed fields out of parsed JSON; every refusal names the dotted field, the file and what was expected."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, expected: str, value: object = _MISSING) -> NoReturn:
        got = "it is missing" if value is _MISSING else f"got {_show(value)}"
        raise VersionError(self.path, "field", f"{field}: expected {expected}, {got}")

    def take(self, obj: dict, where: str, key: str, expected: str, default: object = _MISSING) -> tuple[Any, str]:
        field = f"{where}.{key}" if where else key
        if key in obj:
            return obj[key], field
        if default is _MISSING:
            self.fail(field, expected)
        return default, field

    def integer(self, obj: dict, where: str, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        expected = f"an integer {minimum}..{maximum}" if maximum is not None else f"an integer >= {minimum}"
        value, field = self.take(obj, where, key, expected)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
                maximum is not None and value > maximum):
            self.fail(field, expected, value)
        return value

    def string(self, obj: dict, where: str, key: str, default: object = _MISSING, nullable: bool = False,
               blank: bool = False) -> Any:
        expected = ("a string" if blank else "a non-empty string") + (" or null" if nullable else "")
        if key not in obj and default is not _MISSING:
            return default
        value, field = self.take(obj, where, key, expected)
        if nullable and value is None:
            return value
        if not isinstance(value, str) or not (value or blank):
            self.fail(field, expected, value)
        return value

    def mapping(self, obj: dict, where: str, key: str, default: object = _MISSING, nullable: bool = False) -> Any:
        expected = "an object" + (" or null" if nullable else "")
        if key not in obj and default is not _MISSING:
            return default
        value, field = self.take(obj, where, key, expected)
        if nullable and value is None:
            return value
        if not isinstance(value, dict):
            self.fail(field, expected, value)
        return value

    def items(self, obj: dict, where: str, key: str) -> list:
        value, field = self.take(obj, where, key, "a list")
        if not isinstance(value, list):
            self.fail(field, "a list", value)
        return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name for it: float32, int64, bool
    shape: tuple[int | str, ...]  # a string is a named dynamic axis ("batch"), an int a fixed size

    @classmethod
    def _read(cls, r: _Reader, data: object, field: str) -> TensorSpec:
        if not isinstance(data, dict):
            r.fail(field, "an object with name, dtype, shape", data)
        shape = r.items(data, field, "shape")
        for i, dim in enumerate(shape):
            if not (isinstance(dim, str) and dim) and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
                r.fail(f"{field}.shape[{i}]", "an integer >= 0 or an axis name", dim)
        return cls(r.string(data, field, "name"), r.string(data, field, "dtype"), tuple(shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str  # relative to the version folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @classmethod
    def _read(cls, r: _Reader, data: object, field: str) -> GraphSpec:
        if not isinstance(data, dict):
            r.fail(field, "an object with file, inputs, outputs", data)
        specs = {side: tuple(TensorSpec._read(r, t, f"{field}.{side}[{i}]")
                             for i, t in enumerate(r.items(data, field, side))) for side in ("inputs", "outputs")}
        return cls(r.string(data, field, "file"), specs["inputs"], specs["outputs"])

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class AttentionBlock:
    graph: str
    block: str  # e.g. decoder.1.cross_attn
    layer: int
    kind: str  # one of BLOCK_KINDS
    heads: int
    head_dim: int
    probabilities_output: str | None  # the graph output with this block's probabilities; None in fast graphs
    node: str | None = None  # the block's softmax node in the graph, as export names it

    @classmethod
    def _read(cls, r: _Reader, data: object, field: str, graphs: dict) -> AttentionBlock:
        if not isinstance(data, dict):
            r.fail(field, "an object with graph, block, layer, kind, heads, head_dim", data)
        graph, kind = r.string(data, field, "graph"), r.string(data, field, "kind")
        if graph not in graphs:
            r.fail(f"{field}.graph", f"one of the manifest's graphs {sorted(graphs)}", graph)
        if kind not in BLOCK_KINDS:
            r.fail(f"{field}.kind", f"one of {', '.join(BLOCK_KINDS)}", kind)
        return cls(graph, r.string(data, field, "block"), r.integer(data, field, "layer"), kind,
                   r.integer(data, field, "heads", 1), r.integer(data, field, "head_dim", 1),
                   r.string(data, field, "probabilities_output", nullable=True),
                   r.string(data, field, "node", default=None, nullable=True))

    def to_dict(self) -> dict:
        out = {"graph": self.graph, "block": self.block, "layer": self.layer, "kind": self.kind,
               "heads": self.heads, "head_dim": self.head_dim}
        if self.node is not None:
            out["node"] = self.node
        return {**out, "probabilities_output": self.probabilities_output}


@dataclass(frozen=True)
class ModelShape:
    """The model_config fields serving needs, typed; the rest of the config stays in Manifest.model_config."""

    d_model: int
    n_heads: int
    n_encoder_layers: int
    n_decoder_layers: int
    max_len: int
    src_vocab_size: int
    tgt_vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    suppress_ids: tuple[int, ...] = ()  # never generated (an imported Marian's <pad>); absent in older versions

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def _read(cls, r: _Reader, config: dict) -> ModelShape:
        f = "model_config"
        sizes = {k: r.integer(config, f, k, 1) for k in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                                                         "max_len", "src_vocab_size", "tgt_vocab_size")}
        if sizes["d_model"] % sizes["n_heads"]:
            r.fail(f"{f}.n_heads", f"a divisor of {f}.d_model ({sizes['d_model']})", sizes["n_heads"])
        vocab = min(sizes["src_vocab_size"], sizes["tgt_vocab_size"])  # pad pads sources, bos/eos are targets'
        ids = {k: r.integer(config, f, k, 0, (vocab if k == "pad_id" else sizes["tgt_vocab_size"]) - 1)
               for k in ("pad_id", "bos_id", "eos_id")}
        suppress = config.get("suppress_ids", [])
        if not isinstance(suppress, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < sizes["tgt_vocab_size"] for i in suppress):
            r.fail(f"{f}.suppress_ids", f"a list of target token ids 0..{sizes['tgt_vocab_size'] - 1}", suppress)
        return cls(**sizes, **ids, suppress_ids=tuple(suppress))


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file it was read from, for messages; the version folder is its parent
    format_version: int
    name: str
    version: int
    created: str  # ISO 8601, UTC; "" where the writer did not say
    model: ModelShape
    model_config: dict  # the whole config as export wrote it (serving hands it on as config_json)
    tokenizer: str  # relative to the version folder
    special_ids: dict[str, int]
    task: str | None
    opset: int
    precision: str  # fp32 | int8
    graphs: dict[str, GraphSpec]  # at least GRAPH_NAMES
    attention_blocks: tuple[AttentionBlock, ...]
    files: dict[str, str]  # relative path -> sha256 (hex) of every file of the version but the manifest
    validation: dict  # export's own parity report
    library_versions: dict
    source_checkpoint: dict | None
    export_seconds: float | None
    # How outputs are aligned to sources: {"method": {"heads": [[layer, head], ...], "shift": 0 | 1},
    # "chosen_by": "gold" | "lexical" | "default", "measured": figures against the task's gold or against the
    # lexical baseline (model_src.lexical), or null}; absent in versions exported before alignments, which
    # serving aligns by the default method (model_repository.alignment).
    alignment: dict | None = None

    @classmethod
    def from_dict(cls, data: dict, path: Path) -> Manifest:
        """Check every field's presence and type; VersionError(rule="field") names the first one that is wrong."""
        path = Path(path)
        r = _Reader(path)
        if not isinstance(data, dict):
            r.fail("(the manifest)", "a JSON object", data)
        fmt = r.integer(data, "", "format_version")
        if fmt != FORMAT_VERSION:
            raise VersionError(path, "format-version", f"format_version is {fmt}, and this attnserve reads format "
                                                       f"{FORMAT_VERSION} only: serve it with the attnserve that "
                                                       f"wrote it, or export it again with this one")
        graphs_raw = r.mapping(data, "", "graphs")
        for name in GRAPH_NAMES:
            if name not in graphs_raw:
                r.fail(f"graphs.{name}", f"an object with file, inputs, outputs (needed: {', '.join(GRAPH_NAMES)})")
        graphs = {name: GraphSpec._read(r, spec, f"graphs.{name}") for name, spec in graphs_raw.items()}
        config = r.mapping(data, "", "model_config")
        special_ids = r.mapping(data, "", "special_ids", default={})
        for key, value in special_ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                r.fail(f"special_ids.{key}", "an integer >= 0", value)
        files = r.mapping(data, "", "files")
        for key, digest in files.items():
            if not isinstance(digest, str) or len(digest) != 64 or not _SHA256.issuperset(digest):
                r.fail(f"files[{key!r}]", "a sha256 as 64 lowercase hex digits", digest)
        seconds, field = r.take(data, "", "export_seconds", "a number of seconds or null", None)
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)):
            r.fail(field, "a number of seconds or null", seconds)
        shape = ModelShape._read(r, config)
        return cls(
            path=path, format_version=fmt, name=r.string(data, "", "name"),
            version=r.integer(data, "", "version", 1, MAX_VERSION),
            created=r.string(data, "", "created", "", blank=True),
            model=shape, model_config=dict(config), tokenizer=r.string(data, "", "tokenizer"),
            special_ids=dict(special_ids), task=r.string(data, "", "task", None, nullable=True),
            opset=r.integer(data, "", "opset", 1), precision=r.string(data, "", "precision"), graphs=graphs,
            attention_blocks=tuple(AttentionBlock._read(r, b, f"attention_blocks[{i}]", graphs)
                                   for i, b in enumerate(r.items(data, "", "attention_blocks"))),
            files=dict(files), validation=dict(r.mapping(data, "", "validation")),
            library_versions=dict(r.mapping(data, "", "library_versions", default={})),
            source_checkpoint=r.mapping(data, "", "source_checkpoint", None, nullable=True),
            export_seconds=None if seconds is None else float(seconds),
            alignment=_alignment(r, data, shape))

    def to_dict(self) -> dict:
        """JSON-ready, in the order export writes it; from_dict(to_dict()) gives this manifest back."""
        return {"format_version": self.format_version, "name": self.name, "version": self.version,
                "created": self.created, "model_config": dict(self.model_config), "tokenizer": self.tokenizer,
                "special_ids": dict(self.special_ids), "task": self.task, "opset": self.opset,
                "precision": self.precision, "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
                "attention_blocks": [b.to_dict() for b in self.attention_blocks],
                "library_versions": dict(self.library_versions), "source_checkpoint": self.source_checkpoint,
                "validation": dict(self.validation), "export_seconds": self.export_seconds,
                **({"alignment": self.alignment} if self.alignment is not None else {}), "files": dict(self.files)}

    def file(self, relative: str) -> Path:
        """A file of this version, e.g. `m.file(m.graphs["decoder"].file)`; refuses paths that leave the folder."""
        return contained(self.path.parent, relative, "file", self.path)


def _alignment(r: _Reader, data: dict, shape: ModelShape) -> dict | None:
    section = r.mapping(data, "", "alignment", None, nullable=True)
    if section is None:
        return None
    method = r.mapping(section, "alignment", "method")
    heads = r.items(method, "alignment.method", "heads")
    for i, pair in enumerate(heads):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in pair)
                and 0 <= pair[0] < shape.n_decoder_layers and 0 <= pair[1] < shape.n_heads):
            r.fail(f"alignment.method.heads[{i}]", f"[layer 0..{shape.n_decoder_layers - 1}, head "
                                                    f"0..{shape.n_heads - 1}]", pair)
    if not heads:
        r.fail("alignment.method.heads", "a non-empty list of [layer, head]", heads)
    r.integer(method, "alignment.method", "shift", 0, 1)
    r.string(section, "alignment", "chosen_by")
    r.mapping(section, "alignment", "measured", None, nullable=True)
    return dict(section)


def read_manifest(version_dir: Path) -> dict:
    """The manifest of a version as raw JSON; VersionError(rule="manifest") if missing, unreadable or no object."""
    path = Path(version_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise VersionError(path, "manifest", f"no {MANIFEST}: not a version, or one still being copied") from e
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise VersionError(path, "manifest", f"unreadable ({e})") from e
    if not isinstance(data, dict):
        raise VersionError(path, "manifest", f"expected a JSON object, got {_show(data)}")
    return data


def _same(relative: str) -> str:
    return PurePosixPath(relative).as_posix()  # "./a.onnx" and "a.onnx" name one file


def check_folder(manifest: Manifest, verify_checksums: bool) -> None:
    """The manifest against its folder: version number, containment, every used file listed, sha256."""
    folder = manifest.path.parent
    if not folder.name.startswith(".") and folder.parent.name != manifest.name:  # a staging folder: checked later
        raise VersionError(manifest.path, "name-mismatch",
                           f"the manifest says model {manifest.name!r} but the folder is {folder.parent.name!r}; "
                           "export under the name it is served by instead of renaming the folder")
    number = parse_version(folder.name)
    if number is not None and number != manifest.version:
        raise VersionError(manifest.path, "version-mismatch",
                           f"the manifest says version {manifest.version} but the folder is {folder.name}; "
                           "export versions with `attnserve export` instead of copying them")
    used = {f"graphs.{name}.file": g.file for name, g in manifest.graphs.items()} | {"tokenizer": manifest.tokenizer}
    for field, relative in [*used.items(), *((f"files[{k!r}]", k) for k in manifest.files)]:
        contained(folder, relative, field, manifest.path)
    listed = {_same(k) for k in manifest.files}
    for field, relative in used.items():
        if _same(relative) not in listed:
            raise VersionError(manifest.path, "unlisted-file",
                               f"{field} = {relative!r} is not listed in files, so its sha256 cannot be checked")
    if not verify_checksums:
        return
    for relative, digest in manifest.files.items():
        path = folder / relative
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise VersionError(path, "checksum", f"listed in files with sha256 {digest}, but cannot be read "
                                                 f"({e.strerror or e})") from e
        if actual != digest:
            raise VersionError(path, "checksum", f"sha256 {actual} differs from the manifest's {digest}: "
                                                 "the file changed after export")


def open_version(version_dir: Path, verify_checksums: bool = True) -> Manifest:
    """A version's manifest, once it and the folder are known good; VersionError names the rule broken."""
    manifest = Manifest.from_dict(read_manifest(version_dir), Path(version_dir) / MANIFEST)
    check_folder(manifest, verify_checksums)
    return manifest
