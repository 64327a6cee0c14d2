"""CUDA execution provider: runs only where onnxruntime-gpu sees a GPU (deselected elsewhere, see conftest)."""

import pytest

from serving.client import AttnServeClient
from serving.engine.runner import RunnerConfig
from serving.frontends.server import ServerConfig

from .server_harness import ServerThread


def _server(repo, providers: tuple[str, ...]) -> ServerThread:
    return ServerThread(ServerConfig(repo=repo, address="127.0.0.1:0", metrics_port=None, poll_seconds=0,
                                     drain_seconds=0, models=("tiny",),
                                     runner=RunnerConfig(providers=providers, require_gpu=providers == ("cuda",))))


@pytest.mark.gpu
def test_cuda_provider_serves_the_same_tokens_as_cpu(serving_repo):
    outputs = {}
    for providers in (("cuda",), ("cpu",)):
        s = _server(serving_repo, providers)
        try:
            with AttnServeClient(s.address) as c:
                info = c.model_info("tiny")
                assert info.execution_providers[0] == ("CUDAExecutionProvider" if providers == ("cuda",)
                                                       else "CPUExecutionProvider")
                outputs[providers] = [c.predict(t, attention="cross").text for t in ("abc", "hello", "qwerty")]
        finally:
            s.stop()
    assert outputs[("cuda",)] == outputs[("cpu",)]


def _runner_pair(repo):
    from serving.engine.runner import ModelRunner

    version = repo / "tiny" / "1"
    return (ModelRunner(version, RunnerConfig(providers=("cuda",), require_gpu=True)),
            ModelRunner(version, RunnerConfig(providers=("cpu",))))


@pytest.mark.gpu
def test_cuda_graphs_match_cpu_within_the_export_tolerances(serving_repo):
    import numpy as np

    from serving.engine.feeds import Row, decoder_feeds

    cuda, cpu = _runner_pair(serving_repo)
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in cuda.sessions.values())
    sources = [[4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    enc = {name: r.run_encoder(sources, attention=True) for name, r in (("cuda", cuda), ("cpu", cpu))}
    for key in enc["cpu"]:
        tol = 1e-5 if key == "enc_self_attn" else 1e-4
        np.testing.assert_allclose(enc["cuda"][key], enc["cpu"][key], atol=tol, err_msg=key)
    rows = {name: [Row.start(e["cross_k"][:, i:i + 1, :, :len(s)], e["cross_v"][:, i:i + 1, :, :len(s)], cpu.bos_id)
                   for i, s in enumerate(sources)] for name, e in enc.items()}
    for _ in range(4):  # four steps, each row fed the CPU's greedy token so both sides see the same history
        out = {}
        for name, r in (("cuda", cuda), ("cpu", cpu)):
            feeds, _ = decoder_feeds(rows[name])
            out[name] = r.run_decoder(feeds, attention=True)
        np.testing.assert_allclose(out["cuda"]["logits"], out["cpu"]["logits"], atol=1e-4)
        # IO binding by default on CUDA: the caches stay on the device between steps
        assert cuda.bound and {v.device_name() for v in out["cuda"]["present_k"]} == {"cuda"}
        for key in ("cross_attn", "dec_self_attn"):
            np.testing.assert_allclose(out["cuda"][key], out["cpu"][key], atol=1e-5, err_msg=key)
        tokens = out["cpu"]["logits"].argmax(-1)
        for name in rows:
            for i, row in enumerate(rows[name]):
                row.advance(out[name], i, int(tokens[i]))


@pytest.mark.gpu
def test_a_streamed_generate_on_cuda_equals_cpu_token_for_token_with_its_attention(serving_repo):
    import numpy as np

    streams = {}
    for providers in (("cuda",), ("cpu",)):
        s = _server(serving_repo, providers)
        try:
            with AttnServeClient(s.address) as c:
                streams[providers] = list(c.generate("hello", max_new_tokens=12, attention="cross"))
        finally:
            s.stop()
    gpu, cpu = streams[("cuda",)], streams[("cpu",)]
    assert [m.token.id for m in gpu] == [m.token.id for m in cpu] and gpu[-1].finish.text == cpu[-1].finish.text
    for a, b in zip(gpu, cpu, strict=True):
        assert len(a.attention) == len(b.attention)
        for x, y in zip(a.attention, b.attention, strict=True):
            np.testing.assert_allclose(np.array(x.weights), np.array(y.weights), atol=1e-5)
