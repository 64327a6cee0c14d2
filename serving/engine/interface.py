"""What the rest of the server may rely on from a served model and its engine, declared once.

Two implementations sit behind each protocol: a model version in this process (`ModelRunner`, whose `Engine`
steps it on threads here) and one served by engine processes (`ProcessModel`, whose `EngineProcess` speaks to an
engine across a pipe). The registry and the API speak only these protocols; the functions below are the one place
that tells the two kinds apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from model_repository import Manifest, ModelShape

from .engine import Engine, EngineConfig
from .jobs import Job
from .process import ProcessModel
from .runner import ModelRunner, RunnerConfig
from .tokenizer import ServingTokenizer


@runtime_checkable
class ServingEngine(Protocol):
    """Takes jobs for one model version and answers each through its queue (`Engine.events`)."""

    @property
    def label(self) -> str: ...  # "name vN", for messages

    @property
    def load(self) -> int: ...  # jobs it holds, waiting or running

    @property
    def alive(self) -> bool: ...  # takes new jobs

    @property
    def stopped(self) -> bool: ...  # its threads (or process) ended

    def start(self) -> None: ...  # on the event loop

    def submit(self, job: Job) -> Job: ...  # raises LimitExceeded, Unavailable or EngineClosed when it cannot

    def retire(self) -> None: ...  # takes nothing new, finishes what it holds

    async def close(self, timeout: float = 30.0) -> None: ...


@runtime_checkable
class ServedVersion(Protocol):
    """A loaded model version as the API needs it: its identity, contract, tokenizer and graph-call counts."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def shape(self) -> ModelShape: ...

    manifest: Manifest
    tokenizer: ServingTokenizer
    providers: tuple[str, ...]
    calls: Counter[str]


OnDeath = Callable[[ServingEngine, BaseException], None]


def load_version(path: Path, runner_cfg: RunnerConfig, engine_cfg: EngineConfig,
                 processes: bool) -> ServedVersion:
    """Blocking: load and warm up a version, in this process or in a first engine process."""
    if processes:
        return ProcessModel.load(path, runner_cfg, engine_cfg)
    runner = ModelRunner(path, runner_cfg)
    runner.warm_up()
    return runner


def start_engine(model: ServedVersion, engine_cfg: EngineConfig, on_death: OnDeath) -> ServingEngine:
    """On the event loop: an engine for `model`, started (a process model's is the process it has ready)."""
    engine = model.engine(on_death) if isinstance(model, ProcessModel) else Engine(model, engine_cfg, on_death)
    engine.start()
    return engine


def prepare_restart(model: ServedVersion) -> None:
    """Blocking: what a new engine for `model` needs first (engine processes: a new process, loaded; threads:
    nothing, they reuse the sessions)."""
    if isinstance(model, ProcessModel):
        model.spawn()


def discard_prepared(model: ServedVersion) -> None:
    """Undo `prepare_restart` when the engine it was for is no longer wanted."""
    if isinstance(model, ProcessModel):
        model.discard()

