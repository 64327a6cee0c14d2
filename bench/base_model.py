"""A base-size model for scaling figures: the paper's base shape, untrained and seeded, exported like any other.

    python -m bench.base_model --repo models [--name base] [--checkpoint-dir runs/base]

d_model 512, 8 heads, 6+6 layers, d_ff 2048 ("Attention is all you need", table 3, base), on the `dates` task's
character vocabulary. The weights are the model's own seeded initialisation: the point is the cost of the shape,
not its answers. An untrained model rarely emits <eos>, so its requests run to max_new_tokens, which is what a
scaling figure wants (every request costs the same number of steps). The export runs the normal pipeline with
smaller validation counts so it finishes in minutes on a small machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

BASE = {"d_model": 512, "n_heads": 8, "n_encoder_layers": 6, "n_decoder_layers": 6, "d_ff": 2048, "dropout": 0.1}


def build_base_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write an untrained base-shape checkpoint (model_src.checkpoint layout) to `out`; returns `out`."""
    import torch

    from model_src.checkpoint import save_model
    from model_src.model import ModelConfig, Seq2SeqTransformer
    from model_src.tasks import dates_task
    from model_src.tokenizer import CharTokenizer

    tok = CharTokenizer.from_texts(dates_task(seed).texts())  # the vocabulary the trained dates model has
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size, **BASE))
    save_model(out, model.eval(), tok, {"task": "dates", "training": {"seed": seed, "steps": 0},
                                        "note": "untrained, seeded: for scaling figures only"})
    return out


def export_base(repo: Path, name: str = "base", checkpoint_dir: Path = Path("runs/base"), seed: int = 0,
                progress: Callable[[str], None] = print) -> Path:
    """Build the checkpoint, then export it through export.pipeline with small validation counts."""
    from export.pipeline import ExportConfig, export_checkpoint

    t0 = time.monotonic()
    progress(f"building the base-shape checkpoint in {checkpoint_dir} (d_model 512, 8 heads, 6+6 layers, d_ff 2048)")
    build_base_checkpoint(checkpoint_dir, seed)
    cfg = ExportConfig(checkpoint=checkpoint_dir, repo=repo, name=name, parity_inputs=8, greedy_inputs=8,
                       max_new_tokens=16, seed=seed)
    final = export_checkpoint(cfg, progress=progress)
    progress(f"done in {time.monotonic() - t0:.0f} s: {final}. The model is untrained: it rarely emits <eos>, so "
             f"its requests generate up to max_new_tokens (what scaling figures want; its outputs mean nothing).")
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--name", default="base")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("runs/base"),
                   help="where the untrained checkpoint is written (the manifest records it as the source)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    export_base(args.repo, args.name, args.checkpoint_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
