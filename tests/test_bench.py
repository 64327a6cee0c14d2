"""`attnserve bench` end to end on the tiny model (seconds), the /proc reader, and the parameter arithmetic."""

from __future__ import annotations

import json
import os

import pytest

from bench import report, server_stats
from bench.anchors import parameter_count


@pytest.mark.slow
def test_bench_smoke(tiny_repo, tiny_checkpoint, tmp_path):
    from bench.cli import main

    out = tmp_path / "out"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    argv = ["--repo", str(tiny_repo), "--model", "tiny", "--levels", "1,2", "--duration", "0.5", "--warmup", "0.2",
            "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--benchmarks-md", str(md)]
    assert main(argv) == 0

    result = json.loads((out / "bench.json").read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert lv["tokens_per_s"] > 0 and lv["requests_per_s"] > 0
        assert lv["errors"] == {}
        assert lv["ttft_ms"]["p50"] > 0 and lv["itl_ms"]["p99"] >= lv["itl_ms"]["p50"] > 0
        assert lv["server"]["cpu_per_token_s"] > 0
        assert lv["server"]["rss_before_bytes"] > 0 and lv["server"]["rss_peak_bytes"] > 0
        assert lv["graph"]["cost_per_token_s"] > 0 and lv["graph"]["server_over_graph"] > 0
    assert result["levels"][0]["ratios"]["tokens_per_s_vs_1"] == pytest.approx(1.0)
    assert result["server"]["rss_idle_bytes"] > 0
    assert result["model"]["parameters"] > 0

    anchors = result["anchors"]
    assert anchors["skipped"] == []
    names = " / ".join(c["name"] for c in anchors["comparisons"])
    for expected in ("past 8 vs 128", "attention outputs", "greedy, one request", "new tokens"):
        assert expected in names
    assert all(v["median_ms"] > 0 for c in anchors["comparisons"] for v in c["variants"])
    assert anchors["physical_limit"]["ideal_tokens_per_s_one_core"] > 0

    table = (out / "bench.md").read_text()
    assert "| streams | tokens/s |" in table and "| 2 |" in table
    assert (out / "bench.png").stat().st_size > 0  # matplotlib is in the dev extra

    # The marked section is replaced, the rest kept; a second run replaces it again instead of appending.
    text = md.read_text()
    assert "old table" not in text and table.strip() in text
    assert text.startswith(f"# Benchmarks\n\nbefore\n\n{report.BEGIN}\n") and text.endswith(f"{report.END}\n\nafter\n")
    second = tmp_path / "second"
    assert main(["--repo", str(tiny_repo), "--model", "tiny", "--levels", "1", "--duration", "0.3", "--warmup", "0.1",
                 "--no-anchors", "--out", str(second), "--benchmarks-md", str(md)]) == 0
    text = md.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert (second / "bench.md").read_text().strip() in text and table.strip() not in text
    assert text.startswith(f"# Benchmarks\n\nbefore\n\n{report.BEGIN}\n") and text.endswith(f"{report.END}\n\nafter\n")


def test_marked_section_appended_when_missing(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    for body in ("one", "two"):
        report.update_marked_section(md, body)
    text = md.read_text()
    assert text == f"# Benchmarks\n\n{report.BEGIN}\ntwo\n{report.END}\n"


def test_server_stats_of_this_process():
    before = server_stats.sample(os.getpid())
    sum(i * i for i in range(300_000))  # burn a little CPU
    after = server_stats.sample(os.getpid())
    assert after.cpu_s >= before.cpu_s > 0
    assert 0 < after.rss_bytes <= after.peak_rss_bytes
    assert server_stats.reset_peak(os.getpid())
    assert server_stats.sample(os.getpid()).peak_rss_bytes <= after.peak_rss_bytes


def test_parameter_count_matches_the_model():
    from model_src.model import ModelConfig, Seq2SeqTransformer

    for extra in ({}, {"pre_norm": False}, {"share_embeddings": True}):
        cfg = ModelConfig(src_vocab_size=37, tgt_vocab_size=37, d_model=32, n_heads=4, n_encoder_layers=2,
                          n_decoder_layers=3, d_ff=64, **extra)
        assert parameter_count(cfg.to_dict()) == Seq2SeqTransformer(cfg).num_parameters()
