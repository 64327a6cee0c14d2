"""The paper's base model trained on a GPU in fp32 and in bf16, against this machine's CPU: tokens/s and whether
the loss curves agree. One prepared run for a machine with CUDA (the CPU leg runs anywhere).

    python -m bench.train_gpu --out out/train-gpu [--steps 300 --cpu-steps 20]

Base shape: d_model 512, 8 heads, 6+6 layers, d_ff 2048, on the built-in dates task (generated from its seed, so
nothing needs copying to the GPU machine), batches of --batch-tokens padded tokens. The curves are the validation
losses every --eval-every steps; they agree when bf16's stay within --tolerance (relative) of fp32's after the
first evaluation. Writes figures.json and a Markdown table under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = {"d_model": 512, "n_heads": 8, "n_encoder_layers": 6, "n_decoder_layers": 6, "d_ff": 2048, "dropout": 0.1}


def run(device: str, precision: str, steps: int, args, out: Path) -> dict:
    from model_src.tasks import load_task
    from model_src.train import TrainConfig, train

    cfg = TrainConfig(steps=steps, batch_tokens=args.batch_tokens, warmup=max(steps // 2, 1),
                      lr_factor=0.5, eval_every=min(args.eval_every, steps), eval_examples=64, device=device,
                      precision=precision, max_new_tokens=16)
    print(f"[{device} {precision}] {steps} steps", flush=True)
    result = train(load_task("dates", 0), out / f"{device}-{precision}", dict(BASE), cfg, progress=True)
    return {"device": device, "precision": precision, "steps": steps, "tokens_per_second": result["tokens_per_second"],
            "train_minutes": result["train_minutes"],
            "val_loss": [(h["step"], round(h["val_loss"], 4)) for h in result["history"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/train-gpu"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cpu-steps", type=int, default=20)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--cpu-only", action="store_true", help="the CPU leg alone (no CUDA here)")
    args = p.parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run("cpu", "fp32", args.cpu_steps, args, args.out)]
    if not args.cpu_only:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-only, or on a machine with a GPU")
        runs += [run("cuda", "fp32", args.steps, args, args.out), run("cuda", "bf16", args.steps, args, args.out)]
    figures: dict = {"runs": runs, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if len(runs) == 3:
        fp32, bf16 = dict(runs[1]["val_loss"]), dict(runs[2]["val_loss"])
        gaps = [abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32 if s in bf16][1:]
        figures["bf16_vs_fp32_max_relative_gap"] = round(max(gaps), 4) if gaps else None
        figures["curves_agree"] = bool(gaps) and max(gaps) <= args.tolerance
        figures["speedup_vs_cpu"] = {r["precision"]: round(r["tokens_per_second"] / runs[0]["tokens_per_second"], 1)
                                     for r in runs[1:]}
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
    lines = ["| device | precision | steps | tokens/s | minutes | last val loss |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r['precision']} | {r['steps']} | {r['tokens_per_second']:,} | {r['train_minutes']} "
              f"| {r['val_loss'][-1][1] if r['val_loss'] else '-'} |" for r in runs]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
