"""One loaded model version: its manifest, tokenizer and ONNX Runtime sessions, spoken to in numpy.

Knows nothing of gRPC. Every call blocks; the scheduler runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import FailedPrecondition
from .tokenizer import ServingTokenizer

log = logging.getLogger(__name__)

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GRAPH_NAMES = ("encoder", "encoder_attn", "decoder", "decoder_attn")


class ModelLoadError(RuntimeError):
    """A version folder that cannot be served: missing files, checksum mismatch, or sessions that fail."""


@dataclass(frozen=True)
class RunnerConfig:
    providers: tuple[str, ...] = ("cuda", "cpu")  # tried in order; unavailable ones are skipped (and logged)
    require_gpu: bool = False  # fail instead of falling back to CPU
    intra_op_threads: int = 1  # one thread was as fast as two for small batches here and leaves a core to gRPC
    verify_checksums: bool = True


def check_runtime_install() -> None:
    """onnxruntime and onnxruntime-gpu installed together hide the CUDA provider: say so plainly."""
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        log.warning("both onnxruntime and onnxruntime-gpu are installed; the CUDA provider may be missing. "
                    "Install exactly one (extras 'cpu' or 'gpu').")


def resolve_providers(cfg: RunnerConfig) -> list[str]:
    available = ort.get_available_providers()
    wanted = []
    for name in cfg.providers:
        if name not in PROVIDERS:
            raise FailedPrecondition(f"unknown execution provider {name!r}; use any of: {', '.join(PROVIDERS)}")
        if PROVIDERS[name] in available:
            wanted.append(PROVIDERS[name])
        else:
            log.info("execution provider %s is not available in this onnxruntime build", PROVIDERS[name])
    if cfg.require_gpu and "CUDAExecutionProvider" not in wanted:
        raise FailedPrecondition(f"--require-gpu: CUDAExecutionProvider is not available (available: {available}); "
                                 "install the 'gpu' extra (onnxruntime-gpu) on a machine with CUDA")
    if not wanted:
        raise FailedPrecondition(f"none of the providers {list(cfg.providers)} is available (available: {available})")
    return wanted


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRunner:
    def __init__(self, version_dir: Path, cfg: RunnerConfig) -> None:
        self.dir = Path(version_dir)
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{self.dir}: unreadable manifest.json ({e})") from e
        if cfg.verify_checksums:
            for name, digest in self.manifest.get("files", {}).items():
                path = self.dir / name
                if not path.is_file() or _sha256(path) != digest:
                    raise ModelLoadError(f"{path}: missing or its sha256 differs from the manifest")
        self.name: str = self.manifest["name"]
        self.version: int = int(self.manifest["version"])
        if self.dir.name.isdigit() and int(self.dir.name) != self.version:
            raise ModelLoadError(f"{self.dir}: the manifest says version {self.version} but the folder is "
                                 f"{self.dir.name}; export versions with `attnserve export` instead of copying")
        self.config: dict = self.manifest["model_config"]
        self.tokenizer = ServingTokenizer.load(self.dir / self.manifest["tokenizer"])
        self.n_layers = self.config["n_decoder_layers"]
        self.n_enc_layers = self.config["n_encoder_layers"]
        self.n_heads = self.config["n_heads"]
        self.head_dim = self.config["d_model"] // self.n_heads
        self.max_len = self.config["max_len"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = cfg.intra_op_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = resolve_providers(cfg)
        try:
            self.sessions = {g: ort.InferenceSession(str(self.dir / self.manifest["graphs"][g]["file"]), so,
                                                     providers=providers) for g in GRAPH_NAMES}
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise ModelLoadError(f"{self.dir}: ONNX Runtime cannot load the graphs ({e})") from e
        self.providers: list[str] = self.sessions["decoder"].get_providers()
        self.calls: Counter[str] = Counter()  # runs per graph: shows which requests paid for attention
        log.info("loaded %s v%d from %s on %s", self.name, self.version, self.dir, self.providers)

    @property
    def pad_id(self) -> int:
        return self.config["pad_id"]

    @property
    def bos_id(self) -> int:
        return self.config["bos_id"]

    @property
    def eos_id(self) -> int:
        return self.config["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self.config["tgt_vocab_size"]

    def encode(self, src: list[int], attention: bool) -> dict[str, np.ndarray]:
        """Encoder for one source; cross_k/v (L, 1, nh, S, hs), and with `attention` the encoder extras."""
        ids = np.asarray([src], dtype=np.int64)  # (1, S)
        graph = "encoder_attn" if attention else "encoder"
        self.calls[graph] += 1
        sess = self.sessions[graph]
        outs = sess.run(None, {"src_ids": ids, "src_mask": np.ones_like(ids, dtype=bool)})
        return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))

    def step(self, feeds: dict[str, np.ndarray], attention: bool) -> dict[str, np.ndarray]:
        graph = "decoder_attn" if attention else "decoder"
        self.calls[graph] += 1
        sess = self.sessions[graph]
        outs = sess.run(None, feeds)
        return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))

    def empty_cache(self, batch: int = 1) -> np.ndarray:
        return np.zeros((self.n_layers, batch, self.n_heads, 0, self.head_dim), dtype=np.float32)  # (L,B,nh,0,hs)

    def warm_up(self) -> None:
        """Run every graph once so the first request pays no lazy initialisation."""
        for attention in (False, True):
            enc = self.encode([4, 5, 6], attention)
            self.step({"input_ids": np.array([self.bos_id], dtype=np.int64), "positions": np.zeros(1, np.int64),
                       "self_mask": np.ones((1, 1), dtype=bool), "past_k": self.empty_cache(),
                       "past_v": self.empty_cache(), "cross_k": enc["cross_k"], "cross_v": enc["cross_v"],
                       "src_mask": np.ones((1, 3), dtype=bool)}, attention)
