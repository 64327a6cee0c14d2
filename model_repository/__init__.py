"""The model repository on disk (`REPO/NAME/VERSION/`), shared by export and serving; standard library only."""

from .layout import (
    FORMAT_VERSION,
    MANIFEST,
    RepositoryError,
    VersionError,
    list_models,
    list_versions,
    parse_version,
    sha256_file,
    version_dir,
)
from .manifest import (
    BLOCK_KINDS,
    DECODER_INPUTS,
    ENCODER_INPUTS,
    GRAPH_INPUTS,
    GRAPH_NAMES,
    GRAPH_OUTPUTS,
    AttentionBlock,
    GraphSpec,
    Manifest,
    ModelShape,
    TensorSpec,
    open_version,
    read_manifest,
)
from .publish import discard, prepare, publish, write_manifest

__all__ = [
    "BLOCK_KINDS", "DECODER_INPUTS", "ENCODER_INPUTS", "FORMAT_VERSION", "GRAPH_INPUTS", "GRAPH_NAMES",
    "GRAPH_OUTPUTS", "MANIFEST", "AttentionBlock", "GraphSpec", "Manifest",
    "ModelShape", "RepositoryError", "TensorSpec", "VersionError", "discard", "list_models", "list_versions",
    "open_version", "parse_version", "prepare", "publish", "read_manifest", "sha256_file", "version_dir",
    "write_manifest",
]
