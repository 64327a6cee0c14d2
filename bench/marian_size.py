"""How big an opus-mt model is here: build one of its real shape (random weights), import, export, serve, measure.

    python -m bench.marian_size --out out/marian-size [--levels 1,8 --duration 10]

d_model 512, 8 heads, 6+6 layers, FFN 2048, a 58,101-token vocabulary (bench.marian_model.OPUS_MT). Prints a
Markdown table (import and export times, checkpoint and graph sizes) and runs `attnserve bench` on the export
(tokens/s as clients see them); everything lands under --out. Needs the `hf` and `export` extras.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .marian_model import OPUS_MT, SOURCE_WORDS, build_marian, sentences

MIB = 1024 * 1024


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.marian_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/marian-size"))
    p.add_argument("--levels", default="1,8")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    from bench.cli import main as bench_main
    from export.pipeline import ExportConfig, export_checkpoint
    from model_src.marian import import_marian

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"shape": OPUS_MT.__dict__}
    t0 = time.monotonic()
    print("[1/4] building a Marian model of opus-mt's shape (random weights) with transformers", flush=True)
    folder = build_marian(out / "hf-model", OPUS_MT)
    figures["build_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    print("[2/4] attnserve import-hf", flush=True)
    model, _ = import_marian(folder, out / "checkpoint")
    figures["import_s"] = round(time.monotonic() - t0, 1)
    figures["parameters"] = model.num_parameters()
    del model
    t0 = time.monotonic()
    print("[3/4] attnserve export", flush=True)
    version = export_checkpoint(ExportConfig(checkpoint=out / "checkpoint", repo=out / "repo", name="opus-mt-shape"),
                                progress=lambda line: print("   ", line, flush=True))
    figures["export_s"] = round(time.monotonic() - t0, 1)
    figures["hf_folder_mib"] = round(_size(folder) / MIB, 1)
    figures["checkpoint_mib"] = round(_size(out / "checkpoint") / MIB, 1)
    figures["graphs_mib"] = {f.stem: round(f.stat().st_size / MIB, 1) for f in sorted(version.glob("*.onnx"))}
    figures["weights_mib"] = round((version / "weights.bin").stat().st_size / MIB, 1)  # every graph's tensors, once
    figures["version_mib"] = round(_size(version) / MIB, 1)
    figures["tokenizer_mib"] = round((version / "tokenizer.json").stat().st_size / MIB, 1)
    texts = out / "texts.json"
    texts.write_text(json.dumps(sentences(SOURCE_WORDS, 64, seed=5)), encoding="utf-8")
    print("[4/4] attnserve bench on the export", flush=True)
    bench_main(["--repo", str(out / "repo"), "--model", "opus-mt-shape", "--levels", args.levels, "--duration",
                str(args.duration), "--max-new-tokens", str(args.max_new_tokens), "--texts-file", str(texts),
                "--no-anchors", "--out", str(out / "bench")])
    (out / "figures.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
