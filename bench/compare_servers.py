"""Two servers side by side, one run: the code of this checkout against another checkout (an older commit).

    git worktree add /tmp/before <commit>
    python -m bench.compare_servers --before /tmp/before --repo models --model dates [--rounds 100]

Each checkout's `attnserve serve` runs in its own process on the same model repository; one client process sends
the same calls to both, alternating call by call, so machine noise hits both alike. Prints medians per call kind
and the after/before ratio, and writes Markdown to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .report import publish

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["3rd of March 2021", "mardi 3 mars 2021", "03/03/21", "3. März 2021", "July 4, 1976", "le 14 juillet 1989"]


def _launch(checkout: Path, repo: Path, model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnserve.cli", "serve", "--repo", str(repo), "--model", model,
                             "--address", f"127.0.0.1:{port}", "--metrics-port", "-1", "--poll-seconds", "0",
                             "--log-level", "WARNING"], cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_healthy(port: int, seconds: float = 180.0) -> None:
    """Until the server on `port` answers health SERVING; SystemExit after `seconds`."""
    from serving.client.healthcheck import check

    end = time.monotonic() + seconds
    while not check(f"127.0.0.1:{port}", timeout=1.0):
        if time.monotonic() > end:
            raise SystemExit(f"the server on port {port} did not become healthy")
        time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls(max_new_tokens: int) -> dict[str, Callable]:
    n = max_new_tokens
    return {
        "Generate stream": lambda c, t: list(c.generate(t, max_new_tokens=n)),
        "Generate stream + cross attention": lambda c, t: list(c.generate(t, max_new_tokens=n, attention="cross")),
        "Predict": lambda c, t: c.predict(t, max_new_tokens=n),
        "Predict, all attention": lambda c, t: c.predict(t, max_new_tokens=n, attention="all"),
        "Predict, beam 4": lambda c, t: c.predict(t, max_new_tokens=n, beam_size=4),
        "Encode": lambda c, t: c.encode(t),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    p.add_argument("--after", type=Path, default=ROOT, help="the checkout to compare (default: this one); "
                   "--after equal to --before measures the noise of the comparison itself")
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--model", default="dates")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("out/compare_servers.md"))
    args = p.parse_args(argv)

    from tqdm import tqdm

    from serving.client import AttnServeClient
    ports = {"before": _free_port(), "after": _free_port()}
    procs = [_launch(args.before.resolve(), args.repo.resolve(), args.model, ports["before"]),
             _launch(args.after.resolve(), args.repo.resolve(), args.model, ports["after"])]
    try:
        for port in ports.values():
            wait_healthy(port)
        clients = {k: AttnServeClient(f"127.0.0.1:{port}") for k, port in ports.items()}
        kinds = calls(args.max_new_tokens)
        supported = {}
        for kind, fn in kinds.items():  # an older server may lack a call kind: skip it, say so
            try:
                for c in clients.values():
                    fn(c, TEXTS[0])
                supported[kind] = fn
            except Exception as e:
                print(f"skipping {kind}: {e}", file=sys.stderr)
        times = {(k, v): [] for k in supported for v in clients}
        for i in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            for kind, fn in supported.items():
                for which, c in clients.items():
                    t = time.perf_counter()
                    fn(c, TEXTS[i % len(TEXTS)])
                    times[(kind, which)].append(time.perf_counter() - t)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    lines = [f"Model `{args.model}` from `{args.repo}`, {args.rounds} rounds, up to {args.max_new_tokens} new "
             "tokens, one request at a time, calls alternating between the two servers.", "",
             "| call | before (ms) | after (ms) | after / before |", "|---|---:|---:|---:|"]
    for kind in supported:
        b, a = (statistics.median(times[(kind, w)]) for w in ("before", "after"))
        lines.append(f"| {kind} | {b * 1e3:.2f} | {a * 1e3:.2f} | {a / b:.2f}x |")
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
