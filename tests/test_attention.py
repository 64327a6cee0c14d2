"""Multi-head attention: equal to PyTorch's fused kernel, masks honoured, nothing kept between calls."""

import math

import pytest
import torch
import torch.nn.functional as F

from model_src.model import ModelConfig, MultiHeadAttention, Seq2SeqTransformer

CFG = ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=32, n_heads=4, n_encoder_layers=2,
                  n_decoder_layers=2, d_ff=64, dropout=0.0)


def _mha():
    torch.manual_seed(0)
    return MultiHeadAttention(CFG).eval()


def test_attention_equals_sdpa_with_padding_mask():
    mha = _mha()
    x_q, x_kv = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    out, probs, _, _ = mha(x_q, x_kv, mask)
    q = mha._split_heads(mha.q_proj(x_q))
    k, v = mha.project_kv(x_kv)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Tq, hs)
    ref = mha.out_proj(ref.transpose(1, 2).reshape(3, 5, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 5))
    assert probs[1, :, :, 4:].abs().max().item() == 0.0


def test_causal_mask_equals_sdpa_is_causal():
    mha = _mha()
    x = torch.randn(2, 6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    out, probs, _, _ = mha(x, x, causal)
    q = mha._split_heads(mha.q_proj(x))
    k, v = mha.project_kv(x)
    ref = mha.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.triu(probs, diagonal=1).abs().max().item() == 0.0


def test_fully_masked_row_gives_zeros_not_nan():
    mha = _mha()
    x = torch.randn(1, 4, 32)
    mask = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    out, probs, _, _ = mha(x, x, mask)
    assert not torch.isnan(out).any() and not torch.isnan(probs).any()
    assert probs.abs().max().item() == 0.0


def test_decoder_is_causal_future_tokens_change_nothing_before_them():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(CFG).eval()
    src = torch.randint(4, 20, (1, 5))
    smask = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.randint(4, 20, (1, 6))
    tgt2 = tgt.clone()
    tgt2[0, 4:] = (tgt2[0, 4:] + 1) % 16 + 4
    tm = torch.ones_like(tgt, dtype=torch.bool)
    a = model(src, smask, tgt, tm)
    b = model(src, smask, tgt2, tm)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_inference_leaves_embeddings_unchanged_and_keeps_no_state():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(CFG).eval()
    before = model.src_embed.weight.detach().clone()
    probe = torch.tensor([[5, 6, 7, 8]])
    pm = torch.ones_like(probe, dtype=torch.bool)
    first = model.encode(probe, pm).memory
    with torch.no_grad():
        for _ in range(3):  # other sentences in between
            other = torch.randint(4, 20, (2, 9))
            model.encode(other, torch.ones_like(other, dtype=torch.bool))
    again = model.encode(probe, pm).memory
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert torch.equal(before, model.src_embed.weight)
    assert not any(k for k in vars(model.encoder[0].self_attn) if k in ("attn", "probs", "cache"))


@pytest.mark.parametrize("field,value,needle", [
    ("d_model", 30, "divisible by ModelConfig.n_heads"),
    ("n_encoder_layers", 0, "ModelConfig.n_encoder_layers"),
    ("dropout", 1.5, "ModelConfig.dropout"),
])
def test_bad_config_names_the_field(field, value, needle):
    kwargs = {**CFG.to_dict(), field: value}
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        ModelConfig(**kwargs)


def test_positions_are_the_papers_table():
    model = Seq2SeqTransformer(CFG)
    pe = model.positions
    assert pe[3, 0].item() == pytest.approx(math.sin(3.0))
    assert pe[3, 1].item() == pytest.approx(math.cos(3.0))


@pytest.mark.parametrize("pre_norm", [True, False])
def test_kv_cache_step_equals_full_decode_in_both_norm_placements(pre_norm):
    from model_src.decoding import generate, greedy_no_cache

    torch.manual_seed(3)
    cfg = ModelConfig(**{**CFG.to_dict(), "pre_norm": pre_norm})
    model = Seq2SeqTransformer(cfg).eval()
    assert isinstance(model.encoder_norm, torch.nn.LayerNorm) == pre_norm
    srcs = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    cached = generate(model, srcs, max_new_tokens=10)
    assert cached == [greedy_no_cache(model, s, max_new_tokens=10) for s in srcs]
    src = torch.tensor([srcs[0]])
    m = torch.ones_like(src, dtype=torch.bool)
    enc = model.encode(src, m)
    tgt = torch.tensor([[1, 7, 9, 4]])
    full, _, _ = model.decode(tgt, torch.ones_like(tgt, dtype=torch.bool), enc, m)
    pk, pv = model.empty_cache(1)
    for t in range(4):
        o = model.decode_step(tgt[:, t], torch.tensor([t]), torch.ones(1, t + 1, dtype=torch.bool), pk, pv,
                              enc.cross_k, enc.cross_v, m)
        pk, pv = o.present_k, o.present_v
        torch.testing.assert_close(o.logits, full[:, t], atol=1e-5, rtol=1e-5)
