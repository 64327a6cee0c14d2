"""What `alignment: true` costs a streamed Generate: server CPU per generated token, without attention, with
alignment, with alignment and markup, and with the cross-attention rows themselves, measured side by side.

    python -m bench.alignment_cost --repo models --model dates --rounds 40

One server (`attnserve serve`, its engine in a process of its own) is started; each round sends every variant's
batch of streamed Generates (one stream at a time, or `--streams` at once) in turn, the variants' order rotating
from round to round, and reads the server's CPU time (every thread of the process and its children, in nanoseconds from
/proc/*/task/*/schedstat) around each batch.
The client's own CPU is not counted. Reported: the median over rounds of server CPU microseconds per token, and
each variant against the plain stream.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .compare_servers import ROOT, TEXTS, _free_port, _launch, wait_healthy
from .report import publish
from .server_stats import cpu_seconds_exact

MARKED = ["<b>3rd</b> of <i>March</i> <u>2021</u>", "mardi <b>3</b> <i>mars</i> <u>2021</u>",
          "<b>03</b>/<i>03</i>/<u>21</u>", "<b>3</b>. <i>März</i> <u>2021</u>", "<i>July</i> <b>4</b>, <u>1976</u>",
          "le <b>14</b> <i>juillet</i> <u>1989</u>"]
VARIANTS = {
    "Generate stream": {},
    "+ alignment": {"alignment": True},
    "+ alignment and markup": {"alignment": True, "markup": True},
    "+ cross attention (all heads, every layer)": {"attention": "cross"},
}


def _batch(client, kw: dict, texts: list[str], streams: int, max_new_tokens: int) -> int:
    """Stream every text (`streams` at once); the number of tokens generated."""
    def one(text: str) -> int:
        return sum(m.HasField("token") for m in client.generate(text, max_new_tokens=max_new_tokens, **kw))

    with ThreadPoolExecutor(streams) as pool:
        return sum(pool.map(one, texts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--model", default="dates")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--per-batch", type=int, default=24, help="streams per variant per round")
    p.add_argument("--streams", type=int, default=1, help="streams at once")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("out/alignment_cost.md"))
    args = p.parse_args(argv)

    from tqdm import tqdm

    from serving.client import AttnServeClient

    port = _free_port()
    proc = _launch(ROOT, args.repo.resolve(), args.model, port)
    cost: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        wait_healthy(port)
        names = list(VARIANTS)
        with AttnServeClient(f"127.0.0.1:{port}") as client:
            for name in names:  # warm every path once
                _batch(client, VARIANTS[name], (MARKED if "markup" in VARIANTS[name] else TEXTS)[:2], 1, 4)
            for r in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    kw = VARIANTS[name]
                    pool = MARKED if kw.get("markup") else TEXTS
                    texts = [pool[(r + i) % len(pool)] for i in range(args.per_batch)]
                    before = cpu_seconds_exact(proc.pid)
                    tokens = _batch(client, kw, texts, args.streams, args.max_new_tokens)
                    cost[name].append((cpu_seconds_exact(proc.pid) - before) / max(tokens, 1))
    finally:
        proc.terminate()
        proc.wait()
    base = statistics.median(cost["Generate stream"])
    lines = [f"Model `{args.model}` from `{args.repo}`, {args.rounds} rounds of {args.per_batch} streams per variant "
             f"({args.streams} at a time), up to {args.max_new_tokens} new tokens; the variants' order rotates "
             "every round.", "",
             "| streamed Generate | server CPU us per token (median over rounds) | vs without attention |",
             "|---|---:|---:|"]
    for name in VARIANTS:
        m = statistics.median(cost[name])
        lines.append(f"| {name} | {m * 1e6:.0f} | {m / base:.3f}x |")
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
