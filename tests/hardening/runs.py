"""The long run's servers and whole fuzz, shared by tests/test_hardening.py and `python -m tests.hardening`."""


from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from .fuzz import Fuzzer, FuzzReport, run_fuzz
from .fuzz_oip import OipFuzzer, OipReport, run_grpc, run_http
from .process import ServerProcess, model_facts

# ---------------------------------------------------------------------------------------------- the long run
# The servers run with the allocator settings the product ships (glibc's own, dynamic mmap threshold): the memory
# checks are about what a deployed server does. Measured with them (2,000 cases each, a one-minute soak of 64
# streams): RSS +1.4% over the attnserve.v1 fuzz, +0.8% over the Open Inference Protocol fuzz, +0.7% over the soak's
# last 80%, against the 5% the checks allow; a 200-case warm-up comes first, as a server's first hour would.


def fuzz_server(repo: Path) -> ServerProcess:
    """The fuzz's server: max_message_bytes at 1 MiB, so oversized requests stay cheap to send."""
    return ServerProcess(repo, "--max-message-bytes", str(1 << 20))


def soak_server(repo: Path, streams: int, env: dict[str, str] | None = None) -> ServerProcess:
    """The soak's server: long streams up to 250 tokens. max_concurrent_streams is 1.5x the clients: a client
    that cancels opens its next stream before the server has seen the cancellation, so `streams` clients may
    briefly hold more than `streams` server slots (the documented limit refusing them is not under test here).
    `env`: extra environment (e.g. ATTNSERVE_MMAP_THRESHOLD, which the README documents)."""
    return ServerProcess(repo, "--max-new-tokens", "250", "--max-concurrent-streams", str(streams * 3 // 2),
                         env=env)


KNOWN_GOOD = pb.PredictRequest(model=pb.ModelRef(name="tiny"), source=pb.Source(text="hello"),
                               options=pb.DecodingOptions(max_new_tokens=20))


def fuzz_with_server(repo: Path, n: int, seed: int = 0, warm_up: int = 200) -> tuple[FuzzReport, dict]:
    """The whole fuzz against a fresh server subprocess: warm-up, RSS before, `n` cases, RSS after, the
    known-good Predict before and after, the server's log and exit code."""
    server = fuzz_server(repo)
    out: dict = {}
    try:
        with grpc.insecure_channel(server.address) as ch:
            facts = model_facts(ch)
            out["known_good"] = pb_grpc.AttnServeServiceStub(ch).Predict(KNOWN_GOOD, timeout=30)
        fuzzer = Fuzzer(seed, facts)
        # The warm-up: valid requests, then bad ones of another seed. Without the bad ones the first oversized
        # requests (1 MiB buffers) raise the allocator's high-water mark during the measured run: +8% once,
        # flat after that (measured over four rounds of 2,000), which is warm-up, not growth.
        warm = run_fuzz(server.address, (fuzzer.control(i) for i in range(warm_up)), deadline=30.0)
        warm = run_fuzz(server.address, Fuzzer(seed + 1, facts).cases(warm_up), report=warm)
        out["warm_up_failures"] = warm.failures
        out["before"] = server.stats()
        report = run_fuzz(server.address, fuzzer.cases(n))
        out["after"] = server.stats()
        with grpc.insecure_channel(server.address) as ch:
            out["known_good_after"] = pb_grpc.AttnServeServiceStub(ch).Predict(KNOWN_GOOD, timeout=30)
    finally:
        out["exit_code"] = server.stop()
        out["server_errors"] = server.error_records()
    return report, out


def fuzz_oip_with_server(repo: Path, n: int, seed: int = 0) -> tuple[OipReport, dict]:
    """The Open Inference Protocol fuzz, `n` cases over KServe v2 gRPC and `n` over HTTP, against a fresh server
    subprocess; the known-good Predict, health and RSS before and after, the server's log and exit code."""
    server = ServerProcess(repo, "--max-message-bytes", str(1 << 20), "--http-port", "0")
    out: dict = {}
    report = OipReport()
    fuzzer = OipFuzzer(seed)
    try:
        with grpc.insecure_channel(server.address) as ch:
            out["known_good"] = pb_grpc.AttnServeServiceStub(ch).Predict(KNOWN_GOOD, timeout=30)
        warm = OipFuzzer(seed + 1)  # allocator high-water marks reached before the measured run, as in fuzz_with_server
        run_grpc(server.address, warm.grpc_cases(200), OipReport())
        run_http(server.http_port, warm.http_cases(200), OipReport())
        out["before"] = server.stats()
        run_grpc(server.address, fuzzer.grpc_cases(n), report)
        run_http(server.http_port, fuzzer.http_cases(n), report)
        out["after"] = server.stats()
        with grpc.insecure_channel(server.address) as ch:
            out["known_good_after"] = pb_grpc.AttnServeServiceStub(ch).Predict(KNOWN_GOOD, timeout=30)
            out["health"] = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    finally:
        out["exit_code"] = server.stop()
        out["server_errors"] = server.error_records()
    return report, out


def build_serving_repo(root: Path) -> Path:
    """The `serving_repo` of tests/conftest.py (tiny trained briefly, noisy untrained), built outside pytest."""
    import torch

    from export.pipeline import ExportConfig, export_checkpoint
    from model_src.checkpoint import save_model
    from model_src.model import ModelConfig, Seq2SeqTransformer
    from model_src.tasks import _string_task, reverse_task
    from model_src.tokenizer import CharTokenizer
    from model_src.train import TrainConfig, train
    from tests.conftest import TINY

    repo = root / "models"
    task = _string_task("reverse", lambda s: s[::-1], seed=0, n_train=3000, n_eval=80, max_len=8)
    train(task, root / "tiny", dict(TINY), TrainConfig(steps=150, batch_size=64, warmup=50, eval_every=150,
                                                      eval_examples=32, seed=0, lr_factor=2.0, max_new_tokens=12),
          progress=False)
    export_checkpoint(ExportConfig(checkpoint=root / "tiny", repo=repo, name="tiny", max_new_tokens=12,
                                   greedy_inputs=64), progress=lambda _: None)
    tok = CharTokenizer.from_texts(reverse_task(0, n_train=200, n_eval=20).texts())
    torch.manual_seed(1)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                                           pre_norm=False, **TINY))
    save_model(root / "noisy", model.eval(), tok, {"task": "reverse", "training": {"seed": 0}})
    export_checkpoint(ExportConfig(checkpoint=root / "noisy", repo=repo, name="noisy", max_new_tokens=8,
                                   greedy_inputs=64, parity_inputs=16), progress=lambda _: None)
    return repo
