"""CUDA execution provider: runs only where onnxruntime-gpu sees a GPU (deselected elsewhere, see conftest)."""

import pytest

from serving.client import AttnServeClient
from serving.engine.runner import RunnerConfig
from serving.frontends.server import ServerConfig

from .server_harness import ServerThread


@pytest.mark.gpu
def test_cuda_provider_serves_the_same_tokens_as_cpu(serving_repo):
    outputs = {}
    for providers in (("cuda",), ("cpu",)):
        cfg = ServerConfig(repo=serving_repo, address="127.0.0.1:0", metrics_port=None, poll_seconds=0,
                           drain_seconds=0, models=("tiny",),
                           runner=RunnerConfig(providers=providers, require_gpu=providers == ("cuda",)))
        s = ServerThread(cfg)
        try:
            with AttnServeClient(s.address) as c:
                info = c.model_info("tiny")
                assert info.execution_providers[0] == ("CUDAExecutionProvider" if providers == ("cuda",)
                                                       else "CPUExecutionProvider")
                outputs[providers] = [c.predict(t, attention="cross").text for t in ("abc", "hello", "qwerty")]
        finally:
            s.stop()
    assert outputs[("cuda",)] == outputs[("cpu",)]
