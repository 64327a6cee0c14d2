"""Reference decoding in PyTorch (greedy, sampling, beam search), the yardstick for exported graphs and the server."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Seq2SeqTransformer


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into (B, T) ids and a (B, T) boolean mask of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, torch.arange(T)[None, :] < lengths[:, None]  # (B, T)


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """Apply temperature, top-k and top-p (nucleus) to (B, V) logits; removed entries become -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def suppress(scores: Tensor, ids: tuple[int, ...]) -> Tensor:
    """(B, V) logits or log-probabilities with the model's never-generated ids at -inf."""
    if ids:
        scores = scores.clone()
        scores[:, list(ids)] = float("-inf")
    return scores


@torch.no_grad()
def generate(model: Seq2SeqTransformer, src: list[list[int]], max_new_tokens: int = 32,
             sampling: SamplingConfig | None = None) -> list[list[int]]:
    """Greedy (default) or sampled decoding with the KV cache; returns the ids after <bos>, without <eos>."""
    cfg = model.config
    device = next(model.parameters()).device
    src_ids, src_mask = (x.to(device) for x in pad_batch(src, cfg.pad_id))
    B = src_ids.size(0)
    enc = model.encode(src_ids, src_mask)
    past_k, past_v = model.empty_cache(B, device, enc.memory.dtype)
    token = torch.full((B,), cfg.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    gen = None
    if sampling is not None and sampling.temperature > 0:
        gen = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else 0)
    for step in range(max_new_tokens):
        position = torch.full((B,), step, dtype=torch.long, device=device)
        self_mask = torch.ones(B, step + 1, dtype=torch.bool, device=device)
        o = model.decode_step(token, position, self_mask, past_k, past_v, enc.cross_k, enc.cross_v, src_mask)
        past_k, past_v = o.present_k, o.present_v
        logits = suppress(o.logits, cfg.suppress_ids)
        if gen is None:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(device)
        for i, (tok, finished) in enumerate(zip(token.tolist(), done.tolist(), strict=True)):
            if not finished and tok != cfg.eos_id:
                out[i].append(tok)
        done |= token == cfg.eos_id
        if done.all():
            break
    return out


@torch.no_grad()
def greedy_no_cache(model: Seq2SeqTransformer, src: list[int], max_new_tokens: int = 32) -> list[int]:
    """Greedy decoding that re-runs the full decoder each step: the check that the KV cache changes nothing."""
    cfg = model.config
    src_ids, src_mask = pad_batch([src], cfg.pad_id)
    enc = model.encode(src_ids, src_mask)
    tgt = [cfg.bos_id]
    for _ in range(max_new_tokens):
        t = torch.tensor([tgt])
        logits, _, _ = model.decode(t, torch.ones_like(t, dtype=torch.bool), enc, src_mask)
        nxt = int(suppress(logits[:, -1], cfg.suppress_ids)[0].argmax())
        if nxt == cfg.eos_id:
            break
        tgt.append(nxt)
    return tgt[1:]


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: list[int], beam_size: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
    """Beam search for one source; returns finished hypotheses (ids, score) best first.

    The score is the summed log-probability divided by length ** length_penalty, the length counting <eos>.
    Each step ranks 2 x beam_size candidates: one ending in <eos> among the first beam_size finishes, the best
    beam_size others go on; it stops once beam_size hypotheses have finished, and at the length limit the first
    beam_size candidates finish as they are. This is `transformers`' beam search with early_stopping=True.
    """
    cfg = model.config
    src_ids, src_mask = pad_batch([src], cfg.pad_id)
    enc = model.encode(src_ids, src_mask)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    past_k, past_v = model.empty_cache(1)
    finished: list[tuple[list[int], float]] = []
    for step in range(max_new_tokens):
        n, last = len(beams), step == max_new_tokens - 1
        tokens = torch.tensor([b[0][-1] if b[0] else cfg.bos_id for b in beams])
        o = model.decode_step(tokens, torch.full((n,), step), torch.ones(n, step + 1, dtype=torch.bool),
                              past_k, past_v, enc.cross_k.expand(-1, n, -1, -1, -1),
                              enc.cross_v.expand(-1, n, -1, -1, -1), src_mask.expand(n, -1))
        logp = suppress(torch.log_softmax(o.logits, dim=-1), cfg.suppress_ids)  # (n, V)
        scores = torch.tensor([b[1] for b in beams])[:, None] + logp  # (n, V)
        top = torch.topk(scores.flatten(), min(2 * beam_size, scores.numel()))
        V = logp.size(-1)
        new_beams, keep = [], []
        for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            b, tok = divmod(flat, V)
            ids = beams[b][0] + [tok]
            if tok == cfg.eos_id or last:
                if rank < beam_size:
                    finished.append((ids[:-1] if tok == cfg.eos_id else ids, score / len(ids) ** length_penalty))
            elif len(new_beams) < beam_size:
                new_beams.append((ids, score))
                keep.append(b)
        if len(finished) >= beam_size or last or not new_beams:
            break
        beams = new_beams
        idx = torch.tensor(keep)
        past_k, past_v = o.present_k[:, idx], o.present_v[:, idx]
    return sorted(finished, key=lambda h: -h[1])
