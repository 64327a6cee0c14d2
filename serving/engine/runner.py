"""One loaded model version: its typed manifest, tokenizer and ONNX Runtime sessions, spoken to in numpy.

Knows nothing of gRPC. Every call blocks; only the model's engine thread calls `run_encoder` / `run_decoder`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_repository import (
    GRAPH_NAMES,
    Manifest,
    RepositoryError,
    flat_feeds,
    graph_inputs,
    graph_outputs,
    grouped,
    open_version,
)
from model_repository.tokenizer import load_tokenizer

from ..errors import FailedPrecondition
from .binding import ResidentSources, run_bound
from .feeds import decoder_feeds, encoder_feeds

log = logging.getLogger(__name__)

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
IO_BINDING = ("auto", "on", "off")


class ModelLoadError(RuntimeError):
    """A version folder that cannot be served: a broken rule of the repository, or sessions that fail."""


@dataclass(frozen=True)
class RunnerConfig:
    providers: tuple[str, ...] = ("cuda", "cpu")  # tried in order; unavailable ones are skipped (and logged)
    require_gpu: bool = False  # fail instead of falling back to CPU
    intra_op_threads: int = 1  # one thread was as fast as two for small batches here and leaves a core to gRPC
    verify_checksums: bool = True
    # Load the fast graphs as sessions of their own. Off: the `_attn` graphs serve every request, asked for the
    # fast graphs' outputs only. Measured here, the attention outputs cost 0.9-1.02x the fast graph's step (dates
    # and opus-mt shapes, batch 1 and 16), while each extra session holds its own prepacked copy of every matrix
    # (+200 MiB at opus-mt's size in fp32).
    fast_graphs: bool = False
    # Decoder steps through IO binding, the caches kept where the model runs: "auto" on CUDA, "on" anywhere
    # (on CPU it measured the same as numpy: 0.94-1.00x), "off".
    io_binding: str = "auto"


class GraphSession:
    """One graph of the contract as served by an ONNX Runtime session: a fast graph served by its `_attn` twin
    asks that session for the fast graph's outputs only. Quacks like an InferenceSession for what callers use."""

    def __init__(self, session: ort.InferenceSession, outputs: tuple[str, ...]) -> None:
        self.session = session
        self.output_names = outputs

    def run(self, output_names, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        return self.session.run(list(output_names or self.output_names), feeds, run_options)

    def get_inputs(self):
        return self.session.get_inputs()

    def get_providers(self) -> list[str]:
        return self.session.get_providers()


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


def check_providers(graph: str, path: Path, got: list[str], asked: list[str], require_gpu: bool) -> None:
    """What a session really runs on, against what was asked: ONNX Runtime falls back to CPU with only a warning
    when a provider fails to initialise (missing CUDA libraries, no device)."""
    if require_gpu and (not got or got[0] != PROVIDERS["cuda"]):
        raise ModelLoadError(f"--require-gpu: the {graph} session ({path}) runs on {got}, not on "
                             "CUDAExecutionProvider; check the CUDA and cuDNN libraries onnxruntime-gpu needs")
    if got and asked and got[0] != asked[0]:
        log.warning("the %s session (%s) asked for %s and got %s", graph, path, asked, got)


def session_options(cfg: RunnerConfig) -> ort.SessionOptions:
    """The one place session options are made (the bench's plain loop uses them too)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = cfg.intra_op_threads
    so.inter_op_num_threads = 1
    if cfg.intra_op_threads > 1:  # idle pool threads sleep instead of spinning: the spin took the core gRPC needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class ModelRunner:
    def __init__(self, version_dir: Path, cfg: RunnerConfig) -> None:
        self.dir = Path(version_dir)
        try:
            self.manifest: Manifest = open_version(self.dir, verify_checksums=cfg.verify_checksums)
        except RepositoryError as e:
            raise ModelLoadError(str(e)) from e
        m = self.manifest
        self.name, self.version, self.shape = m.name, m.version, m.model
        self.tokenizer = load_tokenizer(m.file(m.tokenizer))
        providers = resolve_providers(cfg)
        self.sessions = self._load_sessions(cfg, providers)
        self.inputs = {g: tuple(i.name for i in s.get_inputs()) for g, s in self.sessions.items()}
        self.outputs = {g: s.output_names for g, s in self.sessions.items()}
        self.providers: tuple[str, ...] = tuple(self.sessions["decoder"].get_providers())
        self.session_count = len({id(s.session) for s in self.sessions.values()})
        self.device = "cuda" if self.providers[0] == PROVIDERS["cuda"] else "cpu"
        if cfg.io_binding not in IO_BINDING:
            raise FailedPrecondition(f"io_binding {cfg.io_binding!r}: use one of {', '.join(IO_BINDING)}")
        self.bound = cfg.io_binding == "on" or (cfg.io_binding == "auto" and self.device == "cuda")
        self.resident = ResidentSources(self.device)  # cross keys/values on the device, when bound
        self.calls: Counter[str] = Counter()  # runs per graph: shows which requests paid for attention
        self._calls_lock = threading.Lock()
        log.info("loaded %s v%d from %s on %s (%d sessions)", self.name, self.version, self.dir, self.providers,
                 self.session_count)

    def _load_sessions(self, cfg: RunnerConfig, providers: list[str]) -> dict[str, GraphSession]:
        m, so = self.manifest, session_options(cfg)
        loaded: dict[str, ort.InferenceSession] = {}
        for graph in GRAPH_NAMES if cfg.fast_graphs else ("encoder_attn", "decoder_attn"):
            path = m.file(m.graphs[graph].file)
            try:
                loaded[graph] = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise ModelLoadError(f"{self.dir}: ONNX Runtime cannot load the {graph} graph ({e})") from e
            check_providers(graph, path, loaded[graph].get_providers(), providers, cfg.require_gpu)
        sessions = {}
        L = self.shape.n_decoder_layers
        for graph in GRAPH_NAMES:
            session = loaded.get(graph) or loaded[f"{graph}_attn"]
            path = m.file(m.graphs[graph if graph in loaded else f"{graph}_attn"].file)
            inputs, outputs = graph_inputs(graph, L), graph_outputs(graph, L)
            unknown = {i.name for i in session.get_inputs()} - set(inputs)
            if unknown:  # the graphs against the contract, at load, not per request
                raise ModelLoadError(f"{path}: inputs {sorted(unknown)} are not ones this server can feed "
                                     f"({', '.join(inputs)})")
            missing = set(outputs) - {o.name for o in session.get_outputs()}
            if missing:
                raise ModelLoadError(f"{path}: outputs {sorted(missing)} are missing; the {graph} graph must give "
                                     f"{', '.join(outputs)}")
            sessions[graph] = GraphSession(session, outputs)
        return sessions

    @property
    def bos_id(self) -> int:
        return self.shape.bos_id

    @property
    def eos_id(self) -> int:
        return self.shape.eos_id

    def _run(self, graph: str, feeds: dict, outputs: tuple[str, ...] | None = None) -> dict:
        """Feeds by the contract's names (a per-layer cache as one sequence of layers); outputs likewise (all of
        the graph's, or `outputs`). Decoder steps of a bound runner go through IO binding, their present
        keys/values left on the device."""
        with self._calls_lock:  # engine workers run graphs concurrently
            self.calls[graph] += 1
        s = self.sessions[graph]
        names = outputs or s.output_names
        if self.bound and graph.startswith("decoder"):
            values = run_bound(s.session, self.inputs[graph], names, feeds, self.device, self.resident)
        else:
            values = s.run(names, flat_feeds(self.inputs[graph], feeds))
        return grouped(names, values)

    def run_encoder(self, sources: list[list[int]], attention: bool) -> dict[str, np.ndarray]:
        """One encoder pass over right-padded sources: cross_k/v (L, B, nh, S, hs), and the extras with attention."""
        graph = "encoder_attn" if attention else "encoder"
        return self._run(graph, encoder_feeds(sources, self.inputs[graph]))

    def run_decoder(self, feeds: dict, attention: bool, extras: tuple[str, ...] | None = None) -> dict:
        """One decoder step: logits (B, V), present_k/v as L arrays (B, nh, P+1, hs), and attention when asked:
        every attention output, or only `extras` of them (e.g. ("cross_attn",) to align).
        Bound (`io_binding`), present_k/v are OrtValues on the runner's device, fed back as they are."""
        if not attention:
            return self._run("decoder", feeds)
        return self._run("decoder_attn", feeds, (*self.outputs["decoder"], *extras) if extras else None)

    def warm_up(self) -> None:
        """Run every graph once so the first request pays no lazy initialisation."""
        from .jobs import Row

        for attention in (False, True):
            enc = self.run_encoder([[4, 5, 6]], attention)
            row = Row.start(enc["cross_k"], enc["cross_v"], self.bos_id)
            self.run_decoder(decoder_feeds([row])[0], attention)
