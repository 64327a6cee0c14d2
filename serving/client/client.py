"""A Python client for attnserve.v1: plain arguments in, protobuf messages out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from .connection import Connection

ATTENTION = {"none": pb.ATTENTION_KIND_UNSPECIFIED, "cross": pb.ATTENTION_KIND_CROSS, "self": pb.ATTENTION_KIND_SELF,
             "all": pb.ATTENTION_KIND_ALL}


def _source(source: str | Sequence[int]) -> pb.Source:
    if isinstance(source, str):
        return pb.Source(text=source)
    return pb.Source(ids=pb.TokenIds(ids=list(source)))


def _options(max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None, stop=()) -> pb.DecodingOptions:
    o = pb.DecodingOptions(stop=list(stop))
    for field, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k),
                         ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(o, field, value)
    return o


def _attention(kind: str, layers=(), heads=(), mean=False) -> pb.AttentionRequest:
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
    return pb.AttentionRequest(kind=ATTENTION[kind], layers=list(layers), heads=list(heads), mean_over_heads=mean)


class AttnServeClient:
    def __init__(self, address: str = "127.0.0.1:50051", max_message_bytes: int = 64 * 1024 * 1024,
                 connection: Connection | None = None) -> None:
        """`connection`: TLS files and token (default: from ATTNSERVE_TLS_CA / _TLS_CERT / _TLS_KEY / _TOKEN_FILE)."""
        connection = connection or Connection.from_env()
        self.channel = connection.channel(address, options=[("grpc.max_receive_message_length", max_message_bytes)])
        self.metadata = connection.metadata()
        self.stub = pb_grpc.AttnServeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AttnServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, source: str | Sequence[int], model: str = "", version: int = 0, attention: str = "none",
                 layers=(), heads=(), mean_over_heads: bool = False, timeout: float | None = None,
                 alignment: bool = False, markup: bool = False, **options) -> Iterator[pb.GenerateResponse]:
        req = pb.GenerateRequest(model=pb.ModelRef(name=model, version=version), source=_source(source),
                                 options=_options(**options),
                                 attention=_attention(attention, layers, heads, mean_over_heads),
                                 alignment=alignment, markup=markup)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def predict(self, source: str | Sequence[int], model: str = "", version: int = 0, beam_size: int = 0,
                attention: str = "none", layers=(), heads=(), mean_over_heads: bool = False,
                timeout: float | None = None, alignment: bool = False, markup: bool = False,
                **options) -> pb.PredictResponse:
        req = pb.PredictRequest(model=pb.ModelRef(name=model, version=version), source=_source(source),
                                options=_options(**options), beam_size=beam_size,
                                attention=_attention(attention, layers, heads, mean_over_heads),
                                alignment=alignment, markup=markup)
        return self.stub.Predict(req, timeout=timeout, metadata=self.metadata)

    def encode(self, source: str | Sequence[int], model: str = "", version: int = 0) -> pb.EncodeResponse:
        return self.stub.Encode(pb.EncodeRequest(model=pb.ModelRef(name=model, version=version),
                                                 source=_source(source)), metadata=self.metadata)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)

    def model_info(self, model: str = "", version: int = 0) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=model, version=version)),
                                      metadata=self.metadata)

    def reload(self) -> pb.ReloadModelsResponse:
        return self.stub.ReloadModels(pb.ReloadModelsRequest(), metadata=self.metadata)
