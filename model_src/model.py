"""The encoder-decoder Transformer of "Attention is all you need", with attention written out by hand.

Read top to bottom: config, attention, feed-forward, layers, then the seq2seq model whose `encode()` and
`decode_step()` are the seams that export turns into ONNX graphs and the server calls.

Departures from the paper, each on purpose:
- Pre-norm by default (LayerNorm before each sub-layer, one final LayerNorm per stack); the paper's post-norm
  (LayerNorm after each residual addition) is `pre_norm=False`. README gives the figures behind the default.
- Masks are boolean (True = may attend) and filled with the dtype's lowest finite value, never -inf, so a fully
  masked row gives zeros instead of NaN.
- The options after `pre_norm` exist to express imported checkpoints (Marian, see `model_src.marian`); their
  defaults are the paper's choices, and each comment says where the other value departs from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITION_LAYOUTS = ("interleaved", "halves")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


@dataclass(frozen=True)
class ModelConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 256  # longest source or target sequence the positional table covers
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    share_embeddings: bool = False  # only valid when source and target share one vocabulary
    pre_norm: bool = True  # LayerNorm before each sub-layer (False: after each residual add, as in the paper)
    # The paper interleaves sin (even channels) and cos (odd); "halves" puts every sin first, then every cos
    # (Marian, fairseq): the same frequencies in another channel order.
    positions: str = "interleaved"
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) as the paper does (False: unscaled)
    activation: str = "relu"  # the paper's ReLU; "gelu" (exact, erf) or "swish" (SiLU, Marian's opus-mt) instead
    # The output projection reuses the target embedding matrix (the paper shares it; we default to untied)
    tie_output_embeddings: bool = False
    # Token ids never generated (Marian never emits its <pad>, which is also its decoder start); applied by
    # decoding after log-softmax, so the graphs and their logits stay those of the model.
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "suppress_ids", tuple(self.suppress_ids))  # JSON gives a list
        positive = ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
                    "n_decoder_layers", "d_ff", "max_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                             f"ModelConfig.n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("ModelConfig.share_embeddings needs src_vocab_size == tgt_vocab_size")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"ModelConfig.{name} ({value}) is outside the vocabulary")
        choices = {"positions": POSITION_LAYOUTS, "activation": tuple(ACTIVATIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if any(not 0 <= i < self.tgt_vocab_size for i in self.suppress_ids) or self.eos_id in self.suppress_ids:
            raise ValueError(f"ModelConfig.suppress_ids {list(self.suppress_ids)} must be target ids other than eos")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return {**asdict(self), "suppress_ids": list(self.suppress_ids)}  # JSON's shape, so written == read back

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return cls(**data)


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis where `mask` is True; masked entries are exactly 0, a fully masked row all 0."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(~mask, 0.0)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over `n_heads` heads.

    Each head has its own Q, K and V projection: the heads' d_model x head_dim matrices are stored side by side
    in one Linear per Q/K/V (identical maths to one Linear per head, one matmul instead of n_heads), then split
    into heads by a reshape. The heads' outputs are concatenated and `out_proj` brings them back to d_model.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of `x` (B, T, C), each (B, nh, T, hs)."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(self, x_q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from queries `x_q` (B, Tq, C) to keys/values (B, nh, Tk, hs).

        `mask` is boolean, broadcastable to (B, nh, Tq, Tk), True where a query may attend.
        Returns the output (B, Tq, C) and the probabilities (B, nh, Tq, Tk).
        """
        B, Tq, C = x_q.shape
        # 1. project queries into heads
        q = self._split_heads(self.q_proj(x_q))  # (B, nh, Tq, hs)
        # 2. attend, per head
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, Tq, Tk)
        probs = _masked_softmax(scores, mask)
        y = self.dropout(probs) @ v  # (B, nh, Tq, hs)
        # 3. concatenate the heads and project back to d_model
        y = y.transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, nh*hs)
        return self.out_proj(y), probs

    def forward(self, x_q: Tensor, x_kv: Tensor | None, mask: Tensor, past_k: Tensor | None = None,
                past_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Attend from `x_q` to the keys/values of `x_kv`, appended to `past_k`/`past_v` (B, nh, P, hs) if given.

        With `x_kv` None the block attends to `past_k`/`past_v` alone (cross-attention keys computed once).
        Every call goes through here so that each block keeps its own scope in the exported graph.
        Returns the output (B, Tq, C), probabilities (B, nh, Tq, Tk) and the keys/values attended to.
        """
        if x_kv is None:
            k, v = past_k, past_v
        else:
            k, v = self.project_kv(x_kv)
            if past_k is not None:
                k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
                v = torch.cat([past_v, v], dim=2)
        out, probs = self.attend(x_q, k, v, mask)
        return out, probs, k, v


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class _Residual(nn.Module):
    """Where the LayerNorm of a residual sub-layer sits: on its input (pre-norm) or on the sum (post-norm)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.dropout = nn.Dropout(config.dropout)

    def _pre(self, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        return norm(x) if self.pre_norm else x

    def _add(self, norm: nn.LayerNorm, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.dropout(y)
        return x if self.pre_norm else norm(x)


class EncoderLayer(_Residual):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.self_attn = MultiHeadAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self._pre(self.norm1, x)
        a, probs, _, _ = self.self_attn(h, h, mask)
        x = self._add(self.norm1, x, a)
        x = self._add(self.norm2, x, self.ff(self._pre(self.norm2, x)))
        return x, probs


class DecoderLayer(_Residual):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.self_attn = MultiHeadAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.cross_attn = MultiHeadAttention(config)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, self_mask: Tensor, cross_k: Tensor,
                cross_v: Tensor, cross_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, T, C); returns x, this layer's self-attention keys/values with x's appended, and both probs."""
        h = self._pre(self.norm1, x)
        a, self_probs, k, v = self.self_attn(h, h, self_mask, past_k, past_v)
        x = self._add(self.norm1, x, a)
        c, cross_probs, _, _ = self.cross_attn(self._pre(self.norm2, x), None, cross_mask, cross_k, cross_v)
        x = self._add(self.norm2, x, c)
        x = self._add(self.norm3, x, self.ff(self._pre(self.norm3, x)))
        return x, k, v, self_probs, cross_probs


def sinusoidal_positions(max_len: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """The paper's fixed table, wavelengths up to 10000 * 2pi. (max_len, C)

    "interleaved" (the paper): sin on even channels, cos on odd. "halves": channel pair i's sin at i and its cos
    at C/2 + i, computed in float64 as Marian's table is (long positions keep 1e-7, not 1e-5).
    """
    if layout == "halves":
        pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (T, 1)
        angle = pos / torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (T, C/2)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()  # (T, C)
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


class EncoderOutput(NamedTuple):
    memory: Tensor  # (B, S, C)
    cross_k: Tensor  # (L_dec, B, nh, S, hs): every decoder layer's cross-attention keys, computed once
    cross_v: Tensor  # (L_dec, B, nh, S, hs)
    self_attn: Tensor  # (L_enc, B, nh, S, S)


class StepOutput(NamedTuple):
    logits: Tensor  # (B, V)
    present_k: Tensor  # (L_dec, B, nh, P+1, hs), or a list of L_dec (B, nh, P+1, hs) with stacked=False
    present_v: Tensor
    self_attn: Tensor  # (L_dec, B, nh, 1, P+1)
    cross_attn: Tensor  # (L_dec, B, nh, 1, S)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C = config.d_model
        self.src_embed = nn.Embedding(config.src_vocab_size, C)
        self.tgt_embed = self.src_embed if config.share_embeddings else nn.Embedding(config.tgt_vocab_size, C)
        self.register_buffer("positions", sinusoidal_positions(config.max_len, C, config.positions),
                             persistent=False)
        self.embed_scale = math.sqrt(C) if config.scale_embeddings else 1.0
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        # post-norm layers end normalised already; pre-norm stacks need one final LayerNorm
        self.encoder_norm = nn.LayerNorm(C) if config.pre_norm else nn.Identity()
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(C) if config.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(C, config.tgt_vocab_size)
        self.dropout = nn.Dropout(config.dropout)
        self.apply(self._init_weights)
        if config.tie_output_embeddings:
            self.lm_head.weight = self.tgt_embed.weight  # (V, C) either way; the bias stays the head's own

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed_source(self, src_ids: Tensor) -> Tensor:
        """Static token embeddings, scaled as in the paper, before any position or context. (B, S, C)"""
        return self.src_embed(src_ids) * self.embed_scale

    def encode(self, src_ids: Tensor, src_mask: Tensor, return_hidden: bool = False):
        """Encode `src_ids` (B, S); `src_mask` (B, S) is True on real tokens.

        Returns an `EncoderOutput`; with `return_hidden`, also the list of (B, S, C) vectors after each layer.
        """
        _B, S = src_ids.shape
        x = self.dropout(self.embed_source(src_ids) + self.positions[:S])  # (B, S, C)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S): every query may see every real key
        probs, hidden = [], []
        for layer in self.encoder:
            x, p = layer(x, mask)
            probs.append(p)
            hidden.append(x)
        memory = self.encoder_norm(x)
        kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        out = EncoderOutput(memory, torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]),
                            torch.stack(probs))
        return (out, hidden) if return_hidden else out

    def _decode(self, tgt_ids: Tensor, positions: Tensor, self_k_past: Tensor, self_v_past: Tensor,
                self_mask: Tensor, cross_k: Tensor, cross_v: Tensor, src_mask: Tensor):
        """Shared body of the full and the one-step decoder.

        tgt_ids (B, T) at `positions` (B, T); past keys/values (L, B, nh, P, hs); self_mask (B, T, P+T);
        cross keys/values (L, B, nh, S, hs); src_mask (B, S). Caches may be stacked tensors or sequences of L
        per-layer tensors; the present keys/values come back as lists of L tensors (B, nh, P+T, hs).
        """
        x = self.dropout(self.tgt_embed(tgt_ids) * self.embed_scale + self.positions[positions])  # (B, T, C)
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        attn_mask = self_mask[:, None, :, :]  # (B, 1, T, P+T)
        present_k, present_v, self_probs, cross_probs = [], [], [], []
        for i, layer in enumerate(self.decoder):
            x, k, v, sp, cp = layer(x, self_k_past[i], self_v_past[i], attn_mask, cross_k[i], cross_v[i], cross_mask)
            present_k.append(k)
            present_v.append(v)
            self_probs.append(sp)
            cross_probs.append(cp)
        logits = self.lm_head(self.decoder_norm(x))  # (B, T, V)
        return logits, present_k, present_v, torch.stack(self_probs), torch.stack(cross_probs)

    def empty_cache(self, batch: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        cfg = self.config
        shape = (cfg.n_decoder_layers, batch, cfg.n_heads, 0, cfg.head_dim)  # (L, B, nh, 0, hs)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def decode(self, tgt_ids: Tensor, tgt_mask: Tensor, enc: EncoderOutput, src_mask: Tensor):
        """Teacher-forced decoding of the whole target (B, T) at once, causal; returns logits (B, T, V),
        decoder self-attention (L, B, nh, T, T) and cross-attention (L, B, nh, T, S)."""
        B, T = tgt_ids.shape
        positions = torch.arange(T, device=tgt_ids.device).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_ids.device).tril()  # (T, T)
        self_mask = causal[None] & tgt_mask[:, None, :]  # (B, T, T): causal and no padded keys
        past_k, past_v = self.empty_cache(B, tgt_ids.device, enc.memory.dtype)
        logits, _, _, self_probs, cross_probs = self._decode(
            tgt_ids, positions, past_k, past_v, self_mask, enc.cross_k, enc.cross_v, src_mask)
        return logits, self_probs, cross_probs

    def decode_step(self, token: Tensor, position: Tensor, self_mask: Tensor, past_k, past_v, cross_k, cross_v,
                    src_mask: Tensor, stacked: bool = True) -> StepOutput:
        """One decoder step with a KV cache.

        token (B,) is the previous token, at `position` (B,) in its own sequence; past keys/values
        (L, B, nh, P, hs); self_mask (B, P+1) is True on the cache slots that hold a real token, this step's
        own slot (the last) included, so sequences of different lengths can share one batch. With
        `stacked=False` the caches go in and come out as sequences of L per-layer tensors (the exported graph's
        form: no step copies every layer into one tensor).
        """
        logits, pk, pv, sp, cp = self._decode(
            token[:, None], position[:, None], past_k, past_v, self_mask[:, None, :], cross_k, cross_v, src_mask)
        if stacked:
            pk, pv = torch.stack(pk), torch.stack(pv)  # (L, B, nh, P+1, hs)
        return StepOutput(logits[:, -1], pk, pv, sp, cp)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor, tgt_mask: Tensor) -> Tensor:
        """Training forward: logits (B, T, V) for the teacher-forced target."""
        return self.decode(tgt_ids, tgt_mask, self.encode(src_ids, src_mask), src_mask)[0]
