"""Side-by-side latency and throughput of one exported model: PyTorch eager, ONNX Runtime direct, and the gRPC
server (streamed, with and without attention; concurrent streams batched by the model's engine).

    python -m bench.serving_bench --checkpoint checkpoints/dates --version-dir models/dates/1 \
        [--version-dir models/dates-int8/1] [--repeats 30]

Every variant runs on the same inputs in one process, interleaved round by round, so machine noise hits all of
them alike; the table gives medians and ratios to the ORT-direct baseline. Writes Markdown to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path


def config_of(runner) -> dict:
    """The exported model config, as export's reference loop reads it."""
    return runner.manifest.model_config


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/dates"))
    p.add_argument("--version-dir", type=Path, action="append", required=True,
                   help="an exported version; the first is the baseline, others (same repository) add rows")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("out/bench.md"))
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from model_src.checkpoint import load_model
    from model_src.decoding import generate
    from model_src.tasks import load_task
    from serving.client import AttnServeClient
    from serving.domain import DecodeOptions, GenerateRequest, ModelRef, Source
    from serving.engine.runner import ModelRunner, RunnerConfig
    from serving.frontends.server import ServerConfig, create_server

    torch.set_num_threads(1)  # the same one core ORT gets
    model, tok, config = load_model(args.checkpoint)
    pairs = load_task(config["task"], config.get("training", {}).get("seed", 0)).test[: args.repeats]
    sources = [tok.encode(s) for s, _ in pairs]
    from export.validate import ort_greedy

    dirs = args.version_dir
    runners = [ModelRunner(d, RunnerConfig(providers=("cpu",))) for d in dirs]
    for r in runners:
        r.warm_up()
    runner = runners[0]

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    repo = dirs[0].parent.parent
    names = [d.parent.name for d in dirs]
    app = asyncio.run_coroutine_threadsafe(create_server(ServerConfig(
        repo=repo, address="127.0.0.1:0", models=tuple(names), metrics_port=None,
        poll_seconds=0, drain_seconds=0)), loop).result()
    client = AttnServeClient(f"127.0.0.1:{app.port}")
    name = names[0]

    def engine_api(src):
        async def run():
            req = GenerateRequest(ModelRef(name), Source(ids=tuple(src)), DecodeOptions(max_new_tokens=32))
            return [ev async for ev in app.api.generate(req)]
        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    variants = {
        "PyTorch eager, greedy (KV cache)": lambda s: generate(model, [s], max_new_tokens=32),
        "ORT sessions, plain greedy loop": lambda s: ort_greedy(runner.sessions, config_of(runner), [s], 32),
        "engine API, in process": engine_api,
        "gRPC Generate stream": lambda s: list(client.generate(s, model=name, max_new_tokens=32)),
        "gRPC Generate stream + cross attention": lambda s: list(client.generate(s, model=name, max_new_tokens=32,
                                                                                  attention="cross")),
        "gRPC Generate stream + all attention": lambda s: list(client.generate(s, model=name, max_new_tokens=32,
                                                                                attention="all")),
        "gRPC Predict (unary)": lambda s: client.predict(s, model=name, max_new_tokens=32),
        "gRPC Predict, all attention": lambda s: client.predict(s, model=name, max_new_tokens=32, attention="all"),
        "gRPC Predict, beam 4": lambda s: client.predict(s, model=name, max_new_tokens=32, beam_size=4),
        "gRPC Predict, beam 4 + all attention": lambda s: client.predict(s, model=name, max_new_tokens=32,
                                                                         beam_size=4, attention="all"),
        "gRPC Encode": lambda s: client.encode(s, model=name),
    }
    for other, r in zip(names[1:], runners[1:], strict=True):
        precision = r.manifest.precision
        variants[f"ORT sessions, plain greedy loop, {precision}"] = \
            lambda s, r=r: ort_greedy(r.sessions, config_of(r), [s], 32)
        variants[f"gRPC Generate stream, {precision}"] = \
            lambda s, other=other: list(client.generate(s, model=other, max_new_tokens=32))
    for fn in variants.values():  # warm-up
        fn(sources[0])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for src in tqdm(sources, desc="latency rounds", file=sys.stderr):
        for label, fn in variants.items():
            t = time.perf_counter()
            fn(src)
            times[label].append(time.perf_counter() - t)

    # Throughput: the same N requests one after another vs N concurrent streams batched by the engine.
    from concurrent.futures import ThreadPoolExecutor

    n = args.concurrency
    batch = (sources * ((n // len(sources)) + 1))[:n]
    seq_t, conc_t = [], []
    with ThreadPoolExecutor(n) as pool:
        for _ in tqdm(range(5), desc="throughput rounds", file=sys.stderr):
            t = time.perf_counter()
            for s in batch:
                list(client.generate(s, model=name, max_new_tokens=32))
            seq_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            list(pool.map(lambda s: list(client.generate(s, model=name, max_new_tokens=32)), batch))
            conc_t.append(time.perf_counter() - t)

    base = statistics.median(times["ORT sessions, plain greedy loop"])
    shape = runner.shape
    lines = [f"Model: `{dirs[0]}` ({runner.manifest.precision}, d_model {shape.d_model}, "
             f"{shape.n_encoder_layers}+{shape.n_decoder_layers} layers), "
             f"{len(sources)} held-out inputs, up to 32 new tokens, one ORT intra-op thread, one torch thread.",
             "", "| variant (one request at a time) | median ms | vs ORT plain loop |", "|---|---:|---:|"]
    for label, xs in times.items():
        lines.append(f"| {label} | {_median_ms(xs):.2f} | {statistics.median(xs) / base:.2f}x |")
    s, c = statistics.median(seq_t), statistics.median(conc_t)
    lines += ["", f"| {n} requests | median ms | requests/s |", "|---|---:|---:|",
              f"| one after another | {s * 1e3:.1f} | {n / s:.1f} |",
              f"| {n} concurrent streams (continuous batching) | {c * 1e3:.1f} | {n / c:.1f} |",
              "", f"Concurrent / sequential throughput: {s / c:.2f}x."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    client.close()
    asyncio.run_coroutine_threadsafe(app.stop(0), loop).result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
