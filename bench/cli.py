"""`attnserve bench`: the server under closed-loop streaming load, level by level, measured as its users see it.

    attnserve bench --repo models --model dates --checkpoint checkpoints/dates --levels 1,4,16,64 --duration 10
    attnserve bench --server 10.0.0.5:50051 --model dates [--server-pid PID] [--repo models]

With --repo (and no --server) it starts `attnserve serve` on a free loopback port in a process of its own and
stops it at the end. Each level runs the load generator (bench.load) in another process; the server's CPU time
and memory come from /proc (Linux only). Then, with the server stopped, the decoder graph's own cost per token
at each level's batch and length, and the in-process anchors (bench.anchors). Writes bench.json, bench.md and
bench.png (with matplotlib) under --out; --benchmarks-md also puts the Markdown between the bench markers of a
file such as BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model_repository import list_versions, read_manifest, version_dir

from . import load, report, server_stats

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_TEXTS = ["3rd of March 2021", "mardi 3 mars 2021", "03/03/21", "3. März 2021", "July 4, 1976",
                  "le 14 juillet 1989", "14 de julio de 1989", "Monday, January 1, 2001"]
MAX_TEXTS = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("server")
    where.add_argument("--repo", type=Path, help="model repository: the bench serves it (unless --server) and "
                       "reads the model's latest version from it for the graph cost and the anchors")
    where.add_argument("--model", default="dates")
    where.add_argument("--server", metavar="ADDRESS", help="load a running server instead of starting one")
    where.add_argument("--server-pid", type=int, help="with --server on this machine: its pid, for CPU and RSS")
    where.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                       help="a flag for the server the bench starts (repeatable), e.g. --server-flag=--threads=2")
    p.add_argument("--levels", default="1,4,16,64", help="concurrent streams per level, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each level's window")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--checkpoint", type=Path, help="the model's checkpoint: held-out inputs and PyTorch anchors")
    p.add_argument("--texts-file", type=Path, help="a JSON list of source texts to send instead (e.g. for an "
                   "imported model, which has no task)")
    p.add_argument("--int8-version-dir", type=Path, help="an int8 version of the same model, for fp32 vs int8")
    p.add_argument("--no-anchors", action="store_true", help="skip the in-process anchors")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--benchmarks-md", type=Path, help="replace the bench's marked section of this Markdown file")
    return p


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise SystemExit(f"attnserve bench: --levels must be positive integers, comma-separated (got {text!r})")
    return levels


def _latest_version(repo: Path, model: str) -> Path:
    versions = list_versions(repo, model)
    if not versions:
        raise SystemExit(f"attnserve bench: no version of {model!r} in {repo}")
    return version_dir(repo, model, versions[-1])


def _texts(checkpoint: Path | None, task_name: str | None) -> tuple[list[str], str]:
    """Held-out sources of the checkpoint's task (or the manifest's), else a built-in list of dates."""
    from model_src.tasks import TASKS, task_of_checkpoint

    task = None
    if checkpoint is not None:
        task = task_of_checkpoint(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))
    elif task_name in TASKS:
        task = TASKS[task_name](0)
    if task is not None and task.test:
        return [s for s, _ in task.test[:MAX_TEXTS]], f"held-out inputs of the `{task.name}` task"
    return FALLBACK_TEXTS, "built-in date strings"


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def _model_info(version: Path | None, address: str, model: str) -> dict:
    from .anchors import parameter_count

    if version is not None:
        m = read_manifest(version)
        cfg, info = m["model_config"], {"name": m["name"], "version": m["version"], "precision": m["precision"]}
    else:
        from serving.client import AttnServeClient

        with AttnServeClient(address) as client:
            mi = client.model_info(model)
        cfg, info = json.loads(mi.config_json or "{}"), {"name": mi.name, "version": mi.version,
                                                         "precision": mi.precision}
    keys = ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff")
    info.update({k: cfg[k] for k in keys if k in cfg})
    with contextlib.suppress(KeyError, TypeError):
        info["parameters"] = parameter_count(cfg)
    return info


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _start_server(repo: Path, model: str, log_path: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    from serving.client.healthcheck import check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "attnserve.cli", "serve", "--repo", str(repo), "--model",
                                 model, "--address", address, "--metrics-port", "-1", "--poll-seconds", "0",
                                 "--grace-seconds", "2", "--drain-seconds", "0", "--log-level", "WARNING", *flags],
                                env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"attnserve bench: the server exited ({proc.returncode}); its log:\n"
                             f"{log_path.read_text()[-3000:]}")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            healthy = check(address, f"model/{model}", timeout=1.0)  # it prints every answer: keep ours clean
        if healthy:
            return proc, address
        time.sleep(0.2)
    _stop_server(proc)
    raise SystemExit(f"attnserve bench: the server on {address} was not healthy within 180 s; log: {log_path}")


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _PlainBar(list):
    """What tqdm shows, one line per update, where tqdm is not installed (it comes with the train/export extras)."""

    def set_postfix_str(self, text: str) -> None:
        print(f"levels: {text}", file=sys.stderr)


def _progress_bar(levels: list[int]):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(levels)
    return tqdm(levels, desc="levels", unit="level", file=sys.stderr)


def _mark(marks: dict, key: str, pid: int | None) -> None:
    if pid is not None:
        marks[key] = server_stats.sample(pid)


def _run_levels(levels: list[int], address: str, args, texts_file: Path, pid: int | None) -> tuple[list, bool]:
    """Every level, with the server's CPU and memory around each window; returns the levels and whether the
    peak RSS could be reset before each."""
    results, peak_reset = [], pid is not None
    bar = _progress_bar(levels)
    for c in bar:
        bar.set_postfix_str(f"{c} streams")
        marks: dict[str, server_stats.ProcessSample] = {}
        if pid is not None:
            peak_reset = server_stats.reset_peak(pid) and peak_reset
            marks["before"] = server_stats.sample(pid)
        lv = load.run_level(address, args.model, c, args.duration, args.warmup, args.max_new_tokens, texts_file,
                            on_window_start=functools.partial(_mark, marks, "start", pid),
                            on_window_end=functools.partial(_mark, marks, "end", pid))
        if pid is not None:
            _mark(marks, "after", pid)  # VmHWM after the drain: the level's peak, the drain included
            cpu = marks["end"].cpu_s - marks["start"].cpu_s
            lv["server"] = {"cpu_s": cpu, "cpu_cores": cpu / lv["duration_s"],
                            "cpu_per_token_s": cpu / lv["tokens"] if lv["tokens"] else None,
                            "rss_before_bytes": marks["before"].rss_bytes,
                            "rss_peak_bytes": marks["after"].peak_rss_bytes}
        bar.set_postfix_str(f"{c} streams: {lv['tokens_per_s']:.0f} tokens/s")
        results.append(lv)
    return results, peak_reset


def _ratios(levels: list[dict]) -> None:
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    for lv in levels:
        ttft50 = one["ttft_ms"]["p50"] if one else None
        lv["ratios"] = {
            "tokens_per_s_vs_1": lv["tokens_per_s"] / one["tokens_per_s"] if one and one["tokens_per_s"] else None,
            "ttft_p99_vs_p50_at_1": lv["ttft_ms"]["p99"] / ttft50 if ttft50 and lv["ttft_ms"]["p99"] else None}


def _graph_costs(levels: list[dict], version: Path) -> None:
    """Each level's decoder cost per token in process, at the batch and past length of the server's steps.

    The batch is min(streams, 32) (the server's --max-batch default). The server left-pads every row's cache to
    the longest in the step, so a step of b staggered streams with mean output L runs at about the longest of b
    uniform positions in [0, L], L * b / (b + 1): L / 2 for one stream, nearly L for many.
    """
    from .anchors import graph_cost_per_token, load_sessions

    cfg = read_manifest(version)["model_config"]
    sessions = load_sessions(version, ("decoder",))
    for lv in levels:
        batch = min(lv["concurrency"], 32)
        past = max(0, round(lv["mean_output_tokens"] * batch / (batch + 1)))
        src_len = max(1, round(lv["mean_prompt_tokens"]))
        cost = graph_cost_per_token(sessions, cfg, batch, past, src_len)
        server_cost = (lv.get("server") or {}).get("cpu_per_token_s")
        lv["graph"] = {"batch": batch, "past": past, "src_len": src_len, "cost_per_token_s": cost,
                       "server_over_graph": server_cost / cost if server_cost else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = _levels(args.levels)
    if args.server is None and args.repo is None:
        raise SystemExit("attnserve bench: give --repo (the bench serves it) or --server ADDRESS")
    version = _latest_version(args.repo, args.model) if args.repo else None
    if args.texts_file:
        texts, texts_from = json.loads(args.texts_file.read_text(encoding="utf-8")), f"`{args.texts_file.name}`"
    else:
        texts, texts_from = _texts(args.checkpoint, read_manifest(version).get("task") if version else None)
    args.out.mkdir(parents=True, exist_ok=True)
    notes = []
    if sys.platform != "linux" and (args.server is None or args.server_pid):
        notes.append("server CPU and RSS need Linux's /proc: not measured here")

    proc, address, pid = None, args.server, args.server_pid
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        try:
            if args.server is None:
                print(f"starting attnserve serve on {args.repo} ({args.model}) ...", file=sys.stderr)
                proc, address = _start_server(args.repo, args.model, args.out / "server.log", args.server_flag)
                pid = proc.pid
            if sys.platform != "linux":
                pid = None
            model = _model_info(version, address, args.model)
            idle, idle_cores = None, None
            if pid is not None:  # a server that burns CPU while idle would inflate every per-token figure
                idle, window = server_stats.sample(pid), min(1.0, args.duration)
                time.sleep(window)
                idle_cores = (server_stats.sample(pid).cpu_s - idle.cpu_s) / window
            level_results, peak_reset = _run_levels(levels, address, args, texts_file, pid)
        finally:
            if proc is not None:
                _stop_server(proc)
    _ratios(level_results)
    anchors = None
    if version is not None:
        print("decoder graph cost per token at each level's batch ...", file=sys.stderr)
        _graph_costs(level_results, version)
        if not args.no_anchors:
            from .anchors import physical_limit, run_anchors

            src_len = level_results[0]["mean_prompt_tokens"]
            anchors = run_anchors(version, args.checkpoint, args.int8_version_dir, args.max_new_tokens,
                                  max(1, round(src_len)), progress=lambda s: print(s, file=sys.stderr))
            anchors["physical_limit"] = physical_limit(read_manifest(version)["model_config"],
                                                       level_results[0]["mean_output_tokens"] / 2, src_len,
                                                       level_results)
    else:
        notes.append("no --repo: the decoder graph's cost per token and the anchors need the exported graphs")

    import onnxruntime

    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": _machine(),
        "ort_version": onnxruntime.__version__, "model": model,
        "server": {"address": address, "pid": pid, "started_by_bench": proc is not None, "flags": args.server_flag,
                   "rss_idle_bytes": idle.rss_bytes if idle else None, "idle_cpu_cores": idle_cores,
                   "peak_reset": peak_reset},
        "settings": {"levels": levels, "duration_s": args.duration, "warmup_s": args.warmup,
                     "max_new_tokens": args.max_new_tokens, "texts": len(texts), "texts_from": texts_from},
        "levels": level_results, "anchors": anchors, "notes": notes}
    markdown = report.to_markdown(result)
    report.write_json(result, args.out / "bench.json")
    (args.out / "bench.md").write_text(markdown, encoding="utf-8")
    png = report.write_png(result, args.out / "bench.png")
    if args.benchmarks_md:
        report.update_marked_section(args.benchmarks_md, markdown)
    print(markdown)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}"
          + (f", {args.out / 'bench.png'}" if png else " (no PNG: matplotlib is not installed)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
