"""The CTranslate2 peer's measuring process: one Translator (one precision, one thread layout), its greedy check or
its closed-loop load levels, reported as JSON lines on stdout.

    python -m bench.peers.ctranslate2.measure --model OUT/ct2-int8 --compute-type int8 --layout 2x1 \
        --sources OUT/sources.json --levels 1,8,16 --duration 10 --max-new-tokens 64

Started by `run.py`, one process per (precision, layout), because CTranslate2 picks its CPU backend (CT2_USE_MKL)
once, when it is imported, and because RSS after load is only meaningful in a process that loaded one model. Imports
ctranslate2 and the standard library only: no torch, no transformers, so the RSS is the engine's.

Events: {"event": "loaded", "rss_mib", "load_s"}, then either {"event": "check", "hypotheses"} (--check N) or one
{"event": "level", ...} per level, then {"event": "done", "peak_rss_mib"}.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}, ensure_ascii=False), flush=True)


def proc_status_mib(key: str) -> float:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@dataclass(frozen=True)
class Layout:
    """CTranslate2's thread layout: `inter` model replicas (sharing one copy of the weights), `intra` threads each."""

    inter: int
    intra: int

    @classmethod
    def parse(cls, text: str) -> Layout:
        inter, intra = (int(x) for x in text.lower().split("x"))
        if inter < 1 or intra < 1:
            raise ValueError(f"a layout is INTERxINTRA with both >= 1, not {text!r}")
        return cls(inter, intra)

    def __str__(self) -> str:
        return f"{self.inter}x{self.intra}"


@dataclass(frozen=True)
class Decoding:
    """What every translate_batch call gets: plain greedy, capped like transformers' max_new_tokens."""

    max_new_tokens: int
    max_batch_size: int

    def options(self) -> dict:
        return {"beam_size": 1, "max_decoding_length": self.max_new_tokens, "max_batch_size": self.max_batch_size}


@dataclass
class _Request:
    tokens: list[str]
    future: Future = field(default_factory=Future)


_STOP = None  # put once per worker to end the batcher


class Batcher:
    """Gathers pending requests for up to `window_s` after the first one (or until `max_batch_size` are in) into one
    `translate_batch` call. One worker thread per replica (`inter_threads`), so that with two replicas two batches
    run at once; translate_batch releases the GIL while it works."""

    def __init__(self, translator, workers: int, window_s: float, decoding: Decoding):
        self.translator = translator
        self.window_s = window_s
        self.decoding = decoding
        self.pending: queue.Queue[_Request | None] = queue.Queue()
        self.batches: list[tuple[float, int]] = []  # (end time, rows), appended by the workers
        self.threads = [threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, tokens: list[str]) -> Future:
        request = _Request(tokens)
        self.pending.put(request)
        return request.future

    def close(self) -> None:
        for _ in self.threads:
            self.pending.put(_STOP)
        for t in self.threads:
            t.join()

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, deadline = [first], time.perf_counter() + self.window_s
        while len(batch) < self.decoding.max_batch_size:
            try:
                item = self.pending.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self.pending.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            try:
                results = self.translator.translate_batch([r.tokens for r in batch], **self.decoding.options())
            except Exception as e:  # every waiting client fails instead of hanging
                for r in batch:
                    r.future.set_exception(e)
                continue
            self.batches.append((time.perf_counter(), len(batch)))
            for r, result in zip(batch, results, strict=True):
                r.future.set_result(result.hypotheses[0])  # target tokens, without the start token and </s>


@dataclass(frozen=True)
class _Record:
    start: float
    end: float
    tokens: int


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _tokens_in_window(r: _Record, t_start: float, t_end: float) -> float:
    """A request's tokens spread evenly over its life (submitted -> result), the part inside the window: results come
    whole, not streamed, and counting whole requests by their end would make a short window's figure jump by one
    batch's worth of tokens."""
    inside = min(r.end, t_end) - max(r.start, t_start)
    return r.tokens * inside / (r.end - r.start) if inside > 0 else 0.0


def load_level(batcher: Batcher, sources: list[list[str]], concurrency: int, duration: float,
               warmup: float) -> dict:
    """C client threads, each submitting one source after another (cycled, client i starting at i) for the warm-up
    and the window; requests in flight when the window closes finish, and their tokens inside it count."""
    records: list[_Record] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    t_start, t_end = t0 + warmup, t0 + warmup + duration

    def client(i: int) -> None:
        k = i
        while time.perf_counter() < t_end:
            start = time.perf_counter()
            try:
                hypothesis = batcher.submit(sources[k % len(sources)]).result()
            except Exception as e:
                with lock:
                    failures.append(e)
                return
            with lock:
                records.append(_Record(start, time.perf_counter(), len(hypothesis)))
            k += concurrency

    clients = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(concurrency)]
    n_batches = len(batcher.batches)
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {concurrency} clients failed") from failures[0]
    done = [r for r in records if t_start <= r.end <= t_end]
    batches = [rows for end, rows in batcher.batches[n_batches:] if t_start <= end <= t_end]
    tokens = sum(_tokens_in_window(r, t_start, t_end) for r in records)
    return {
        "concurrency": concurrency, "duration_s": duration, "tokens": tokens, "tokens_per_s": tokens / duration,
        "requests": len(done), "requests_per_s": len(done) / duration,
        "latency_ms": _percentiles([(r.end - r.start) * 1e3 for r in done]),
        "mean_output_tokens": statistics.fmean(r.tokens for r in done) if done else 0.0,
        "batches": len(batches), "mean_batch_rows": statistics.fmean(batches) if batches else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.ctranslate2.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a converted CTranslate2 model folder")
    p.add_argument("--compute-type", required=True, help="float32 or int8")
    p.add_argument("--layout", type=Layout.parse, required=True, help="INTERxINTRA threads, e.g. 2x1")
    p.add_argument("--sources", type=Path, required=True, help="JSON list of source token lists (with </s>)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--check", type=int, default=0, help="translate the first N sources one at a time and stop")
    p.add_argument("--levels", default="1", help="concurrent clients per level, comma-separated")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    a = p.parse_args(argv)
    import ctranslate2

    sources = json.loads(a.sources.read_text(encoding="utf-8"))
    started = time.perf_counter()
    translator = ctranslate2.Translator(str(a.model), device="cpu", compute_type=a.compute_type,
                                        inter_threads=a.layout.inter, intra_threads=a.layout.intra)
    _emit("loaded", rss_mib=proc_status_mib("VmRSS"), load_s=time.perf_counter() - started)
    if a.check:
        # One source per batch, as the reference decodes them: no padding, nothing shared between rows.
        results = translator.translate_batch(sources[:a.check], **Decoding(a.max_new_tokens, 1).options())
        _emit("check", hypotheses=[r.hypotheses[0] for r in results])
    else:
        batcher = Batcher(translator, a.layout.inter, a.batch_window_ms / 1e3,
                          Decoding(a.max_new_tokens, a.max_batch_size))
        try:
            for c in (int(x) for x in a.levels.split(",") if x.strip()):
                _emit("level", **load_level(batcher, sources, c, a.duration, a.warmup))
        finally:
            batcher.close()
    _emit("done", peak_rss_mib=proc_status_mib("VmHWM"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
