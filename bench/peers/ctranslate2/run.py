"""Peer benchmark: a Marian model (a transformers folder) on CTranslate2, greedy, under closed-loop clients, fp32 and
int8, in two thread layouts; checked token for token against transformers first.

    python -m bench.peers.ctranslate2.run --hf-model out/marian-size/hf-model --texts-file texts.json --out OUT \
        [--levels 1,8,16] [--duration 10] [--max-new-tokens 64] [--precisions fp32,int8] [--layouts 1x2,2x1]

Converts the folder once per precision (CTranslate2's TransformersConverter), decodes the first 32 texts greedily
with transformers' MarianMTModel and with each precision, compares the generated token ids, then measures every
(precision, layout) in a process of its own (`measure.py`, with the precision's CPU backend in its environment): C
client threads, one request each at a time, behind a 5 ms batcher that hands each batch to one translate_batch
call. Writes OUT/ct2_results.json and OUT/ct2_tokens.json and prints a Markdown table. A peer for comparison only:
nothing in attnserve imports it. Needs `pip install ctranslate2==4.8.5` beside transformers and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .measure import Layout

ROOT = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024
# name -> (compute_type at load, quantization at conversion)
PRECISIONS = {"fp32": ("float32", None), "int8": ("int8", "int8")}
# CT2_USE_MKL per backend. Measured on a 2-core AVX2 machine without VNNI: fp32 is twice as fast
# on oneDNN as on MKL, int8 fastest on MKL.
BACKENDS = {"mkl": "1", "onednn": "0"}
DEFAULT_BACKENDS = "fp32=onednn,int8=mkl"
ENGINE_INFO = ("Selected ISA", "Use Intel MKL", "SGEMM backend", "GEMM_S8 backend", "Selected compute type")


@dataclass(frozen=True)
class PeerConfig:
    hf_model: Path
    texts_file: Path
    out: Path
    levels: tuple[int, ...]
    duration: float
    warmup: float
    max_new_tokens: int
    precisions: tuple[str, ...]
    layouts: tuple[Layout, ...]
    backends: dict[str, str]  # precision -> "mkl" | "onednn"
    check_texts: int
    batch_window_ms: float
    max_batch_size: int
    zero_pad_row: bool
    reference_tokens: Path | None  # another engine's ids instead of transformers'

    def __post_init__(self) -> None:
        if unknown := set(self.precisions) - set(PRECISIONS):
            raise ValueError(f"unknown precisions {sorted(unknown)}; known: {sorted(PRECISIONS)}")
        if missing := set(self.precisions) - set(self.backends):
            raise ValueError(f"no backend for {sorted(missing)} in --backends")
        if bad := {b for b in self.backends.values() if b not in BACKENDS}:
            raise ValueError(f"unknown backends {sorted(bad)}; known: {sorted(BACKENDS)}")


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def _versions() -> dict:
    out = {}
    for dist in ("ctranslate2", "transformers", "torch", "sentencepiece"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = sys.version.split()[0]
    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    out["cpu"], out["cpu_count"] = cpu.group(1) if cpu else None, os.cpu_count()
    return out


# ---------------------------------------------------------------------------------------------- the model
def prepare_folder(cfg: PeerConfig) -> tuple[Path, float]:
    """The folder every engine reads, and the norm of the given folder's decoder <pad> embedding row.

    CTranslate2 starts Marian's decoder from a zero vector where transformers embeds <pad> (the decoder start token);
    real opus-mt checkpoints have a zero <pad> row, bench.marian_model's random ones do not. --zero-pad-row writes a
    copy with that row zeroed, so that both engines run the same function."""
    import torch
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(cfg.hf_model)
    pad = model.config.pad_token_id
    norm = float(model.get_decoder().embed_tokens.weight[pad].detach().norm())
    if not cfg.zero_pad_row or norm == 0.0:
        return cfg.hf_model, norm
    folder = cfg.out / "hf-model-zero-pad"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(cfg.hf_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    with torch.no_grad():  # the encoder's row too (the same tensor unless the vocabularies are separate)
        for embedding in (model.get_encoder().embed_tokens, model.get_decoder().embed_tokens):
            embedding.weight[pad].zero_()
    model.save_pretrained(folder)
    return folder, norm


def convert(folder: Path, out: Path, precision: str) -> dict:
    from ctranslate2.converters import TransformersConverter

    started = time.monotonic()
    quantization = PRECISIONS[precision][1]
    TransformersConverter(str(folder)).convert(str(out), quantization=quantization, force=True)
    return {"dir": str(out), "quantization": quantization, "convert_s": round(time.monotonic() - started, 1),
            "mib": round(_size_mib(out), 1)}


# ---------------------------------------------------------------------------------------------- token ids
def reference_ids(folder: Path, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ids, one text at a time, without the decoder start token and from </s> on.

    forced_eos_token_id is switched off: Marian's config forces </s> as the last token allowed by max_new_tokens,
    which CTranslate2 (like attnserve) does not do, so every capped sequence would differ in its last token."""
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(folder)
    model = MarianMTModel.from_pretrained(folder).eval()
    eos = model.config.eos_token_id
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = model.generate(**tokenizer(text, return_tensors="pt"), num_beams=1, do_sample=False,
                                 max_new_tokens=max_new_tokens, forced_eos_token_id=None)[0].tolist()[1:]
            out.append(ids[:ids.index(eos)] if eos in ids else ids)
    return out


def agreement(ids: list[list[int]], reference: list[list[int]]) -> dict:
    differing = [i for i, (a, b) in enumerate(zip(ids, reference, strict=True)) if a != b]
    return {"identical": len(ids) - len(differing), "of": len(ids), "differing": differing}


# ---------------------------------------------------------------------------------------------- the measuring processes
def measure(cfg: PeerConfig, model_dir: Path, sources: Path, precision: str, layout: Layout, *,
            check: int = 0) -> dict:
    """One measuring process; its events as they come, CTranslate2's own account of its backend from its log."""
    backend = cfg.backends[precision]
    env = {**os.environ, "CT2_USE_MKL": BACKENDS[backend], "CT2_VERBOSE": "1"}
    cmd = [sys.executable, "-m", "bench.peers.ctranslate2.measure", "--model", str(model_dir), "--compute-type",
           PRECISIONS[precision][0], "--layout", str(layout), "--sources", str(sources), "--max-new-tokens",
           str(cfg.max_new_tokens), "--batch-window-ms", str(cfg.batch_window_ms), "--max-batch-size",
           str(cfg.max_batch_size)]
    cmd += ["--check", str(check)] if check else ["--levels", ",".join(map(str, cfg.levels)), "--duration",
                                                  str(cfg.duration), "--warmup", str(cfg.warmup)]
    err_path = cfg.out / "logs" / f"{precision}-{layout}{'-check' if check else ''}.stderr"
    err_path.parent.mkdir(parents=True, exist_ok=True)
    run = {"precision": precision, "layout": str(layout), "inter_threads": layout.inter,
           "intra_threads": layout.intra, "backend": backend, "levels": []}
    with open(err_path, "w+") as err, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                                       text=True) as proc:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "loaded":
                run["rss_after_load_mib"], run["load_s"] = round(event["rss_mib"], 1), round(event["load_s"], 2)
                print(f"    {precision} {layout}: loaded in {event['load_s']:.2f} s, RSS {event['rss_mib']:.0f} MiB",
                      flush=True)
            elif kind == "check":
                run["hypotheses"] = event["hypotheses"]
            elif kind == "level":
                run["levels"].append(event)
                print(f"    {precision} {layout} C={event['concurrency']:<3} tok/s {event['tokens_per_s']:9.1f}  "
                      f"req/s {event['requests_per_s']:8.1f}  mean batch {event['mean_batch_rows']:5.1f} rows",
                      flush=True)
            elif kind == "done":
                run["peak_rss_mib"] = round(event["peak_rss_mib"], 1)
        proc.wait()
    log = Path(err_path).read_text(errors="replace")
    if proc.returncode != 0 or "peak_rss_mib" not in run:
        raise RuntimeError(f"{precision} {layout} failed (exit {proc.returncode}); {err_path}:\n{log[-2000:]}")
    run["engine"] = {m.group(1): m.group(2).strip() for m in re.finditer(r"\[info\]\s+(?:- )?([^:\n]+): ([^\n]*)", log)
                     if m.group(1) in ENGINE_INFO}
    return run


# ---------------------------------------------------------------------------------------------- the report
def best_layouts(runs: list[dict]) -> dict:
    best: dict[str, dict[str, tuple[str, float]]] = {}  # precision -> level -> (layout, tokens/s)
    for run in runs:
        for level in run["levels"]:
            by_level = best.setdefault(run["precision"], {})
            current = by_level.get(str(level["concurrency"]))
            if current is None or level["tokens_per_s"] > current[1]:
                by_level[str(level["concurrency"])] = (run["layout"], level["tokens_per_s"])
    return {p: {c: layout for c, (layout, _) in levels.items()} for p, levels in best.items()}


def markdown(report: dict) -> str:
    levels = report["settings"]["levels"]
    lines = ["| precision | layout | backend | " + " | ".join(f"tok/s C={c}" for c in levels)
             + " | RSS after load MiB | on disk MiB |", "|---|---|---|" + "---:|" * (len(levels) + 2)]
    for run in report["runs"]:
        by_c = {lv["concurrency"]: lv["tokens_per_s"] for lv in run["levels"]}
        lines.append(f"| {run['precision']} | {run['layout']} | {run['backend']} | "
                     + " | ".join(f"{by_c[c]:,.0f}" for c in levels)
                     + f" | {run['rss_after_load_mib']:,.0f} | {report['converted'][run['precision']]['mib']:,.1f} |")
    check = report["agreement"]
    lines.append("")
    lines += [f"- greedy token ids, {name}: {a['identical']}/{a['of']} sequences identical"
              for name, a in check["pairs"].items()]
    lines += [f"- best layout, {p}: " + ", ".join(f"C={c} {layout}" for c, layout in by_c.items())
              for p, by_c in report["best_layout"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> PeerConfig:
    p = argparse.ArgumentParser(prog="python -m bench.peers.ctranslate2.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", type=Path, required=True, help="a Marian folder saved by transformers")
    p.add_argument("--texts-file", type=Path, required=True, help="a JSON list of source texts, cycled")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--levels", default="1,8,16", help="concurrent clients per level, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each level's window")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--layouts", default="1x2,2x1", help="inter_threads x intra_threads, comma-separated")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help="CPU backend per precision: mkl or onednn")
    p.add_argument("--check-texts", type=int, default=32, help="how many of the first texts the token check takes")
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--zero-pad-row", action="store_true",
                   help="zero the <pad> embedding row first (as real opus-mt has it; see prepare_folder)")
    p.add_argument("--reference-tokens", type=Path,
                   help="a JSON list of generated id lists from another engine, instead of running transformers")
    a = p.parse_args(argv)
    return PeerConfig(
        hf_model=a.hf_model.resolve(), texts_file=a.texts_file.resolve(), out=a.out.resolve(),
        levels=tuple(int(x) for x in a.levels.split(",") if x.strip()), duration=a.duration, warmup=a.warmup,
        max_new_tokens=a.max_new_tokens, precisions=tuple(x.strip() for x in a.precisions.split(",") if x.strip()),
        layouts=tuple(Layout.parse(x.strip()) for x in a.layouts.split(",") if x.strip()),
        backends=dict(kv.split("=", 1) for kv in a.backends.split(",") if kv.strip()), check_texts=a.check_texts,
        batch_window_ms=a.batch_window_ms, max_batch_size=a.max_batch_size, zero_pad_row=a.zero_pad_row,
        reference_tokens=a.reference_tokens.resolve() if a.reference_tokens else None)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    texts = json.loads(cfg.texts_file.read_text(encoding="utf-8"))
    n_check = min(cfg.check_texts, len(texts))
    report: dict = {"peer": "ctranslate2", "versions": _versions(), "settings": {
        "hf_model": str(cfg.hf_model), "texts_file": str(cfg.texts_file), "levels": list(cfg.levels),
        "duration_s": cfg.duration, "warmup_s": cfg.warmup, "max_new_tokens": cfg.max_new_tokens,
        "precisions": list(cfg.precisions), "layouts": [str(x) for x in cfg.layouts], "backends": cfg.backends,
        "check_texts": n_check, "batch_window_ms": cfg.batch_window_ms, "max_batch_size": cfg.max_batch_size,
        "zero_pad_row": cfg.zero_pad_row}}

    print(f"[1/5] converting {cfg.hf_model} with CTranslate2 ({', '.join(cfg.precisions)})", flush=True)
    folder, pad_norm = prepare_folder(cfg)
    report["model"] = {"folder": str(folder), "pad_row_norm": pad_norm, "pad_row_zeroed": folder != cfg.hf_model}
    if folder != cfg.hf_model:
        print(f"    zeroed the <pad> embedding row (norm {pad_norm:.3f}) in a copy: {folder}", flush=True)
    elif pad_norm:
        print(f"    note: the <pad> embedding row is not zero (norm {pad_norm:.3f}); CTranslate2 starts the decoder "
              "from zeros, so expect disagreement (--zero-pad-row)", flush=True)
    report["converted"] = {}
    for precision in cfg.precisions:
        report["converted"][precision] = c = convert(folder, cfg.out / f"ct2-{precision}", precision)
        print(f"    {precision}: {c['dir']} {c['mib']:.1f} MiB in {c['convert_s']:.1f} s", flush=True)

    from transformers import MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(folder)
    sources = cfg.out / "sources.json"  # what the measuring processes read: no tokenizer there
    sources.write_text(json.dumps([tokenizer.convert_ids_to_tokens(tokenizer.encode(t)) for t in texts],
                                  ensure_ascii=False), encoding="utf-8")
    target_vocab = tokenizer.get_tgt_vocab() if tokenizer.separate_vocabs else tokenizer.get_vocab()

    if cfg.reference_tokens:
        print(f"[2/5] reference: {cfg.reference_tokens}", flush=True)
        reference_name = str(cfg.reference_tokens)
        reference = json.loads(cfg.reference_tokens.read_text())[:n_check]
    else:
        print(f"[2/5] transformers greedy reference on the first {n_check} texts", flush=True)
        reference_name = "transformers"
        reference = reference_ids(folder, texts[:n_check], cfg.max_new_tokens)

    print(f"[3/5] CTranslate2 greedy on the first {n_check} texts, compared token ids", flush=True)
    tokens = {"texts": texts[:n_check], "max_new_tokens": cfg.max_new_tokens, "model": str(folder),
              "ids": "greedy target ids, without the decoder start token and </s>",
              "reference": {"name": reference_name, "ids": reference}}
    pairs = {}
    for precision in cfg.precisions:
        run = measure(cfg, cfg.out / f"ct2-{precision}", sources, precision, cfg.layouts[0], check=n_check)
        unknown = {t for h in run["hypotheses"] for t in h if t not in target_vocab}
        if unknown:
            raise RuntimeError(f"{precision}: tokens outside the target vocabulary: {sorted(unknown)[:5]}")
        tokens[f"ct2_{precision}"] = [tokenizer.convert_tokens_to_ids(h) for h in run["hypotheses"]]
        pairs[f"{precision} vs {reference_name}"] = agreement(tokens[f"ct2_{precision}"], reference)
    if {"fp32", "int8"} <= set(cfg.precisions):
        pairs["int8 vs fp32"] = agreement(tokens["ct2_int8"], tokens["ct2_fp32"])
    for name, a in pairs.items():
        print(f"    {name}: {a['identical']}/{a['of']} identical", flush=True)
    report["agreement"] = {"texts": n_check, "reference": reference_name, "pairs": pairs}
    (cfg.out / "ct2_tokens.json").write_text(json.dumps(tokens, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"[4/5] throughput: levels {','.join(map(str, cfg.levels))}, {cfg.duration:g} s each after "
          f"{cfg.warmup:g} s warm-up, one process per precision and layout", flush=True)
    report["runs"] = [measure(cfg, cfg.out / f"ct2-{precision}", sources, precision, layout)
                      for precision in cfg.precisions for layout in cfg.layouts]
    report["best_layout"] = best_layouts(report["runs"])

    out = cfg.out / "ct2_results.json"
    print(f"[5/5] wrote {out} and {cfg.out / 'ct2_tokens.json'}\n", flush=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
