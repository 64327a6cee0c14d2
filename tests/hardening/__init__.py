"""Hardening runners in the style of Triton's L0 QA suites: a seeded fuzzer of bad requests, a soak of concurrent
streams, and `attnserve serve` as a subprocess whose /proc and /metrics they read.

tests/test_hardening.py runs bounded versions in CI; the documented long run prints a report and exits 1 on any
failure:

    python -m tests.hardening --fuzz 10000 --oip 10000 --soak-minutes 10 [--repo DIR] [--seed 0]

Without --repo it trains and exports the tiny `tiny` and untrained `noisy` models of tests/conftest.py first
(the `train` and `export` extras).

The package: common.py (the service, status groups), process.py (the server subprocess), fuzz.py (the fuzzer of
attnserve.v1), fuzz_oip.py (the fuzzer of KServe v2 over gRPC and of HTTP), soak.py (concurrent streams), runs.py
(the servers and whole runs the tests share), __main__.py (the long run)."""

from .fuzz import Fuzzer, long_name
from .fuzz_oip import OipFuzzer
from .process import ModelFacts
from .runs import fuzz_oip_with_server, fuzz_with_server, soak_server
from .soak import SHORT_TEXTS, Intent, Tally, drive, generate_request, run_soak

__all__ = ["SHORT_TEXTS", "Fuzzer", "Intent", "ModelFacts", "OipFuzzer", "Tally", "drive", "fuzz_oip_with_server",
           "fuzz_with_server", "generate_request", "long_name", "run_soak", "soak_server"]
