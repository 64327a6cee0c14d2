"""Checkpoint in, validated version of the model repository out: export, check, compare, quantize, publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from model_repository import (
    GRAPH_NAMES,
    VersionError,
    discard,
    list_versions,
    open_version,
    prepare,
    publish,
    sha256_file,
    version_dir,
    write_manifest,
)
from model_src.alignment_eval import alignment_record
from model_src.checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_model
from model_src.tasks import task_of_checkpoint

from .blocks import expected_blocks, find_blocks, tag_blocks
from .graphs import export_graph
from .quality import QualityGate, compare
from .quantize import quantize_graph
from .validate import Tolerances, ValidationError, check_graphs, enforce, greedy_agreement, ort_greedy, parity, session
from .weights import share_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    repo: Path = Path("models")
    name: str = "default"
    version: int | None = None  # None: the next integer
    opset: int = 20
    quantize: str | None = None  # None, "int8" (dynamic, fused int8 GEMMs) or "int4" (weight-only blocks)
    quality: QualityGate = field(default_factory=QualityGate)  # what a quantized version must keep of fp32
    validate_on: str = "cpu"  # execution provider of the checks: cpu or cuda
    parity_inputs: int = 64
    greedy_inputs: int = 128
    max_new_tokens: int = 48
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    alignment_pairs: int = 500  # validation pairs the alignment method is chosen on, test pairs it is measured on
    alignment_data: Path | None = None  # a parallel TSV for choosing it where the task has no gold (default: the
    # corpus the checkpoint was trained on, if it has one)


def _versions() -> dict:
    import onnxruntime
    import onnxscript
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}


def _checkpoint_hash(ckpt: Path) -> str:
    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        h.update(sha256_file(ckpt / name).encode())
    return h.hexdigest()


def up_to_date(repo: Path, name: str, checkpoint: Path, quantize: str | None) -> Path | None:
    """The latest version of `name` if it was exported from this very checkpoint with the same precision."""
    existing = list_versions(repo, name)
    if not existing:
        return None
    latest = version_dir(repo, name, existing[-1])
    try:
        manifest = open_version(latest, verify_checksums=False)
    except VersionError as e:  # a broken latest version is not "up to date": export a new one beside it
        log.warning("the latest version breaks a rule of the repository, exporting anew: %s", e)
        return None
    try:
        same = (manifest.source_checkpoint or {}).get("sha256") == _checkpoint_hash(checkpoint)
    except OSError:  # an incomplete checkpoint: let the export itself report it
        return None
    return latest if same and manifest.precision == (quantize or "fp32") else None


def _held_out(task, tok, vocab: int, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """The task's test split; where the training data cannot be found (`task` None), random token strings stand
    in."""
    held = [(tok.encode(s), tok.encode(t)) for s, t in task.test[:n]] if task is not None else []
    rng = random.Random(seed)  # a small or missing test split is topped up so every check sees n inputs
    return held + [([rng.randrange(4, vocab) for _ in range(rng.randint(1, 24))], []) for _ in range(n - len(held))]


def _io_spec(model: onnx.ModelProto) -> dict:
    def spec(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def export_checkpoint(cfg: ExportConfig, progress: Callable[[str], None] = print) -> Path:
    """Run the whole export; returns the published version folder. Leaves the repository untouched on failure."""
    t0 = time.monotonic()
    progress(f"[1/7] loading checkpoint {cfg.checkpoint}")
    model, tok, ckpt_config = load_model(cfg.checkpoint)
    mcfg = model.config.to_dict()
    version, staging = prepare(cfg.repo, cfg.name, cfg.version)
    try:
        paths = {name: staging / f"{name}.onnx" for name in GRAPH_NAMES}
        graphs_meta, blocks = {}, []
        for i, (name, path) in enumerate(paths.items(), start=1):
            progress(f"[2/7] exporting graph {i}/4: {name}")
            export_graph(model, name, path, cfg.opset)
            proto = onnx.load(str(path))
            tag_blocks(proto)
            found = find_blocks(proto, name, model.config.head_dim)
            want = expected_blocks(mcfg, name)
            if len(found) != want or any(b.heads != model.config.n_heads for b in found):
                raise ValidationError(f"{name}: found {len(found)} attention blocks with heads "
                                      f"{[b.heads for b in found]}, config says {want} x {model.config.n_heads}")
            onnx.save(proto, str(path))
            graphs_meta[name] = {"file": path.name, **_io_spec(proto)}
            blocks += [b.to_dict() for b in found]
        progress("[3/7] onnx.checker full check")
        check_graphs(paths)
        sessions = {name: session(path, provider=cfg.validate_on) for name, path in paths.items()}
        task = task_of_checkpoint(ckpt_config)  # built once: the checks and the alignment read it
        held = _held_out(task, tok, model.config.src_vocab_size,
                         max(cfg.parity_inputs, cfg.greedy_inputs), cfg.seed)
        progress(f"[4/7] parity with PyTorch on {cfg.parity_inputs} held-out inputs (batches of 16, padded)")
        report = {"parity": parity(model, sessions, [s for s, _ in held[:cfg.parity_inputs]],
                                   max_steps=cfg.max_new_tokens),
                  "tolerances": asdict(cfg.tolerances)}
        progress(f"[5/7] greedy decoding, PyTorch vs ONNX Runtime, on {cfg.greedy_inputs} held-out inputs")
        report["greedy"] = greedy_agreement(model, sessions, [s for s, _ in held[:cfg.greedy_inputs]],
                                            cfg.max_new_tokens)
        enforce(report, cfg.tolerances)
        precision = cfg.quantize or "fp32"
        if cfg.quantize:
            progress(f"[6/7] {cfg.quantize} quantization and its quality gate against fp32 on {len(held)} inputs")
            report["quantization"], sessions = _quantize(paths, sessions, mcfg, held, tok, cfg)
        else:
            progress("[6/7] no quantization requested")
        progress(f"[7/7] alignment: the heads that align best on {cfg.alignment_pairs} held-out pairs")
        corpus = cfg.alignment_data or (Path(ckpt_config["data"]) if ckpt_config.get("data") else None)
        alignment = alignment_record(model, tok, task, cfg.alignment_pairs, cfg.alignment_pairs, progress,
                                     corpus=corpus if corpus is not None and corpus.is_file() else None,
                                     seed=ckpt_config.get("training", {}).get("seed", 0))
        report["weights"] = _share(paths, staging, sessions, mcfg, [s for s, _ in held[:16]], cfg, progress)
        report["validated_on"] = cfg.validate_on
        shutil.copy(cfg.checkpoint / ckpt_config.get("tokenizer", TOKENIZER), staging / TOKENIZER)
        write_manifest(staging, {
            "name": cfg.name, "version": version, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model_config": mcfg, "tokenizer": TOKENIZER,
            "special_ids": {"pad": mcfg["pad_id"], "bos": mcfg["bos_id"], "eos": mcfg["eos_id"],
                            "unk": tok.unk_id},  # the tokenizer's own: an imported Marian's is not 3
            "task": ckpt_config.get("task"), "opset": cfg.opset, "precision": precision, "graphs": graphs_meta,
            "attention_blocks": blocks, "library_versions": _versions(),
            "source_checkpoint": {"path": str(cfg.checkpoint), "sha256": _checkpoint_hash(cfg.checkpoint)},
            "validation": report, "alignment": alignment, "export_seconds": round(time.monotonic() - t0, 1)})
        final = publish(staging, cfg.repo, cfg.name, version)
    except BaseException:
        discard(staging)
        raise
    progress(f"published {final} ({precision}, {time.monotonic() - t0:.0f} s)")
    return final


def _quantize(paths, sessions, mcfg, held, tok, cfg: ExportConfig) -> tuple[dict, dict]:
    """Quantize every graph in place; the gate's report and the quantized sessions (what will be published)."""
    for path in paths.values():
        tmp = path.with_suffix(f".{cfg.quantize}.onnx")
        quantize_graph(path, tmp, cfg.quantize)
        tmp.replace(path)
    q_sessions = {name: session(path, provider=cfg.validate_on) for name, path in paths.items()}
    return compare(sessions, q_sessions, mcfg, held, tok.decode, cfg.max_new_tokens, cfg.quantize, cfg.quality), \
        q_sessions


def _share(paths, staging: Path, validated: dict, mcfg: dict, sources: list[list[int]], cfg: ExportConfig,
           progress) -> dict:
    """Move every graph's tensors into one weights file, each once, and check the published files decode as the
    `validated` sessions (loaded before the move) do."""
    before = ort_greedy(validated, mcfg, sources, cfg.max_new_tokens)
    sharing = share_weights(paths, staging)
    published = {g: session(paths[g], provider=cfg.validate_on) for g in ("encoder", "decoder")}
    after = ort_greedy(published, mcfg, sources, cfg.max_new_tokens)
    if before != after:
        raise ValidationError("the graphs decode differently once their weights are shared; not published")
    progress(f"      one weights file: {sharing.bytes_written / 2**20:.1f} MiB for "
             f"{sharing.bytes_referenced / 2**20:.1f} MiB of tensors in {len(paths)} graphs")
    return sharing.to_dict()
