"""Hardening runners in the style of Triton's L0 QA suites: a seeded fuzzer of bad requests, a soak of concurrent
streams, and `attnserve serve` as a subprocess whose /proc and /metrics they read.

tests/test_hardening.py runs bounded versions in CI; the documented long run prints a report and exits 1 on any
failure:

    python -m tests.hardening --fuzz 10000 --oip 10000 --soak-minutes 10 [--repo DIR] [--seed 0]

Without --repo it trains and exports the tiny `tiny` and untrained `noisy` models of tests/conftest.py first
(the `train` and `export` extras).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .runs import build_serving_repo, fuzz_oip_with_server, fuzz_with_server, soak_server
from .soak import run_soak


def _report(report, m: dict, seconds: float) -> bool:
    """Print a fuzz run and its server's state after it; True when it failed."""
    growth = m["after"].rss_bytes / m["before"].rss_bytes - 1
    same = list(m["known_good"].tokens) == list(m["known_good_after"].tokens)
    print("\n".join(report.lines()))
    print(f"  RSS before {m['before'].rss_bytes / 2**20:.1f} MiB, after {m['after'].rss_bytes / 2**20:.1f} "
          f"MiB ({growth:+.2%}); threads {m['before'].threads} -> {m['after'].threads}, fds "
          f"{m['before'].fds} -> {m['after'].fds}")
    print(f"  known-good Predict after the fuzz: {'same answer' if same else 'DIFFERENT'} "
          f"({m['known_good_after'].text!r}); server errors logged: {len(m['server_errors'])}; "
          f"exit code {m['exit_code']}; {seconds:.0f} s")
    for line in m["server_errors"][:20]:
        print(f"    {line}")
    return bool(report.failures or m.get("warm_up_failures") or m["server_errors"]) or not same \
        or abs(growth) > 0.05 or m["exit_code"] != 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hardening", description=__doc__.split("\n\n")[0])
    p.add_argument("--fuzz", type=int, default=10000, help="bad requests to send (0: no fuzz)")
    p.add_argument("--oip", type=int, default=10000,
                   help="cases per Open Inference Protocol surface (KServe v2 gRPC, HTTP) to send (0: none)")
    p.add_argument("--soak-minutes", type=float, default=10.0, help="0: no soak")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repo", type=Path, help="a repository with models tiny and noisy (default: build one)")
    args = p.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory(prefix="hardening-") as tmp:
        repo = args.repo
        if repo is None:
            print("building the tiny and noisy models ...", flush=True)
            repo = build_serving_repo(Path(tmp))
        for n, run in ((args.fuzz, fuzz_with_server), (args.oip, fuzz_oip_with_server)):
            if n:
                t0 = time.monotonic()
                report, m = run(repo, n, args.seed)
                failed |= _report(report, m, time.monotonic() - t0)
        if args.soak_minutes:
            server = soak_server(repo, args.streams)
            try:
                soak = run_soak(server, args.soak_minutes * 60, args.streams, args.seed)
            finally:
                code = server.stop()
            errors = server.error_records()
            print("\n".join(soak.lines()))
            print(f"  exit code {code}; server errors logged: {len(errors)}")
            for line in errors[:10]:
                print(f"    {line}")
            failed |= bool(soak.problems() or errors) or code != 0
    print("FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
