"""The messages between the server and an engine process, typed: what crosses the pipe (pickled) and nothing else.

    server -> engine   Submit(job id, kind, spec)   Cancel(job id)   Retire()
    engine -> server   Ready(providers) or Failed(message), once, after loading and warming up
                       Events([(job id, events)], stats) once per iteration that has events or changed the load
                       Dead(message): the engine thread failed; the process then exits

A job crosses as its kind and its spec (`Job.spec()`: the request as plain data); the engine process rebuilds it
with its own tokenizer and shape (`rebuild`), and a spec it cannot rebuild fails that job alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from model_repository import ModelShape

from .jobs import BeamJob, EncodeJob, Job, SequenceJob
from .tokenizer import ServingTokenizer


class JobKind(enum.Enum):
    SEQUENCE = "sequence"
    BEAM = "beam"
    ENCODE = "encode"


JOB_CLASSES: dict[JobKind, type[Job]] = {JobKind.SEQUENCE: SequenceJob, JobKind.BEAM: BeamJob,
                                         JobKind.ENCODE: EncodeJob}


def kind_of(job: Job) -> JobKind:
    for kind, cls in JOB_CLASSES.items():
        if type(job) is cls:
            return kind
    raise TypeError(f"{type(job).__name__} is not a job an engine process runs ({', '.join(k.value for k in JobKind)})")


@dataclass(frozen=True)
class Submit:
    job_id: int
    kind: JobKind
    spec: dict  # Job.spec(): the request's fields as plain, picklable data

    def rebuild(self, shape: ModelShape, tokenizer: ServingTokenizer) -> Job:
        return JOB_CLASSES[self.kind](**self.spec, shape=shape, tokenizer=tokenizer)


@dataclass(frozen=True)
class Cancel:
    job_id: int


@dataclass(frozen=True)
class Retire:
    pass


@dataclass(frozen=True)
class Ready:
    providers: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Stats:
    steps: int = 0
    encoder_passes: int = 0
    waiting: int = 0
    load: int = 0  # jobs waiting or running
    calls: dict[str, int] = field(default_factory=dict)  # session runs per graph


@dataclass(frozen=True)
class Events:
    batch: list[tuple[int, list]]  # (job id, that job's events this iteration)
    stats: Stats


@dataclass(frozen=True)
class Dead:
    message: str


ToEngine = Submit | Cancel | Retire
FromEngine = Ready | Failed | Events | Dead
