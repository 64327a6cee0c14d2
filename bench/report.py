"""The bench's outputs: JSON, a Markdown table, a PNG of throughput and latency against concurrency."""

from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- attnserve-bench:begin -->", "<!-- attnserve-bench:end -->"
MIB = 1024 * 1024


def _f(value, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{suffix}"


def _errors(errors: dict) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0"


def _header(r: dict) -> list[str]:
    m, mach, s = r["model"], r["machine"], r["settings"]
    shape = ""
    if m.get("d_model"):
        shape = (f" ({m.get('precision', '?')}, d_model {m['d_model']}, {m['n_heads']} heads, "
                 f"{m['n_encoder_layers']}+{m['n_decoder_layers']} layers, d_ff {m['d_ff']}"
                 + (f", {m['parameters']:,} parameters" if m.get("parameters") else "") + ")")
    srv = r["server"]
    where = "started by the bench" if srv["started_by_bench"] else f"at {srv['address']}"
    if srv.get("flags"):
        where += f" with `{' '.join(srv['flags'])}`"
    idle = (f", idle RSS {srv['rss_idle_bytes'] / MIB:.0f} MiB and {srv['idle_cpu_cores']:.2f} cores of CPU"
            if srv.get("rss_idle_bytes") else "")
    return [
        f"## `attnserve bench`: `{m['name']}` v{m.get('version', '?')} over gRPC, {r['date'][:10]}", "",
        f"Machine: {mach['cpu_model']}, {mach['cores']} cores (os.cpu_count()); ONNX Runtime {r['ort_version']}. "
        f"Model `{m['name']}` v{m.get('version', '?')}{shape}.",
        f"Closed loop: at each level, C clients (grpc.aio coroutines in one load-generator process) each send a "
        f"streaming Generate (max_new_tokens {s['max_new_tokens']}) one after another, texts cycled from "
        f"{s['texts']} {s['texts_from']}; {s['warmup_s']:g} s warm-up, then {s['duration_s']:g} s measured. "
        f"Server: `attnserve serve` in its own process, {where}{idle}.", ""]


def _load_table(levels: list[dict]) -> list[str]:
    lines = ["| streams | tokens/s | vs 1 stream | requests/s | TTFT p50 ms | TTFT p99 ms | TTFT p99 / p50 at 1 "
             "stream | inter-token p50 ms | inter-token p99 ms | mean tokens | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lv in levels:
        ratios = lv["ratios"]
        lines.append(
            f"| {lv['concurrency']} | {_f(lv['tokens_per_s'])} | {_f(ratios['tokens_per_s_vs_1'], 2, 'x')} | "
            f"{_f(lv['requests_per_s'])} | {_f(lv['ttft_ms']['p50'], 2)} | {_f(lv['ttft_ms']['p99'], 2)} | "
            f"{_f(ratios['ttft_p99_vs_p50_at_1'], 1, 'x')} | {_f(lv['itl_ms']['p50'], 2)} | "
            f"{_f(lv['itl_ms']['p99'], 2)} | {_f(lv['mean_output_tokens'])} | {_errors(lv['errors'])} |")
    return lines


def _cost_table(levels: list[dict]) -> list[str]:
    lines = ["| streams | server CPU (cores) | server CPU ms / token | decoder graph ms / token (batch, past) | "
             "server / graph | server RSS before / peak MiB | load generator CPU (cores) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        srv, graph = lv.get("server") or {}, lv.get("graph") or {}
        cost = srv.get("cpu_per_token_s")
        g = graph.get("cost_per_token_s")
        g_text = f"{g * 1e3:.3f} ({graph['batch']}, {graph['past']})" if g else "–"
        rss = (f"{srv['rss_before_bytes'] / MIB:.0f} / {srv['rss_peak_bytes'] / MIB:.0f}"
               if srv.get("rss_peak_bytes") else "–")
        lines.append(f"| {lv['concurrency']} | {_f(srv.get('cpu_cores'), 2)} | "
                     f"{_f(cost * 1e3 if cost else None, 3)} | {g_text} | "
                     f"{_f(graph.get('server_over_graph'), 1, 'x')} | {rss} | "
                     f"{_f(lv['client_cpu_s'] / lv['duration_s'], 2)} |")
    return lines


def _anchor_lines(anchors: dict | None) -> list[str]:
    if anchors is None:
        return ["Anchors: not run (--no-anchors, or no --repo to read the graphs from)."]
    lines = ["In-process anchors (medians, interleaved; one ORT intra-op thread, one torch thread):", "",
             "| anchor | A | A ms | B | B ms | B / A |", "|---|---|---:|---|---:|---:|"]
    for c in anchors["comparisons"]:
        (a, b) = c["variants"]
        name = c["name"] + (f" ({c['note']})" if c.get("note") else "")
        lines.append(f"| {name} | {a['label']} | {a['median_ms']:.3f} | {b['label']} | {b['median_ms']:.3f} | "
                     f"{c['ratio']:.2f}x |")
    lines += [f"Skipped: {s}." for s in anchors.get("skipped", [])]
    lim = anchors.get("physical_limit")
    if lim:
        lines += ["", f"Physical limit: {lim['flops_per_token'] / 1e6:.2f} MFLOP per generated token (2 x "
                  f"{lim['decoder_params_per_token']:,} decoder parameters touched, plus attention over "
                  f"{lim['past']:.0f} past and {lim['src_len']:.0f} source tokens); one thread multiplies float32 "
                  f"512x512 matrices at {lim['matmul_gflops_one_thread']:.1f} GFLOP/s here, so one core could "
                  f"at best make {lim['ideal_tokens_per_s_one_core']:,.0f} tokens/s. 1 stream reaches "
                  f"{_f(lim['fraction_1_stream'] and 100 * lim['fraction_1_stream'], 1, '%')} of that, the best "
                  f"level ({lim['best_level']} stream{'s' if lim['best_level'] != 1 else ''}) "
                  f"{_f(lim['fraction_best'] and 100 * lim['fraction_best'], 1, '%')}."]
    return lines


def _rss_note(server: dict) -> str:
    if server.get("pid") is None:
        return "Server CPU and RSS not measured: no pid (--server without --server-pid, or not Linux)."
    if server.get("peak_reset"):
        return "RSS is summed over the server's processes; peak is each one's VmHWM, reset before each level."
    return "RSS peak is VmHWM since the server started (it could not be reset)."


def to_markdown(r: dict) -> str:
    lines = _header(r) + _load_table(r["levels"]) + [""]
    lines += ["Cost: server CPU time (utime + stime of its process and its engine processes, all threads) during "
              "the window over the tokens "
              "generated in it, against the decoder graph's own cost per token (one step / batch) measured in "
              "process with one intra-op thread at the batch the server steps (min(streams, 32)) and the past "
              "length its padded step has (the longest of b staggered streams: mean output x b / (b + 1)); the "
              "ratio also carries the encoder pass (once per request), gRPC, protobuf and the engine's Python. "
              + _rss_note(r["server"]), ""]
    lines += [*_cost_table(r["levels"]), "", *_anchor_lines(r.get("anchors"))]
    notes = r.get("notes") or []
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def publish(text: str, path: Path) -> None:
    """A bench's Markdown: printed, and written to `path` (its folder made)."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(r: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(r, indent=2), encoding="utf-8")


def write_png(r: dict, path: Path) -> bool:
    """Tokens/s, TTFT and inter-token latency against concurrency; False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = r["levels"]
    x = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, [lv["tokens_per_s"] for lv in levels], "o-")
    axes[0].set_title("tokens/s")
    axes[0].set_ylim(bottom=0)
    for ax, key, title in ((axes[1], "ttft_ms", "time to first token (ms)"),
                           (axes[2], "itl_ms", "inter-token latency (ms)")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [lv[key][q] for lv in levels], style, label=q)
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{r['model']['name']} v{r['model'].get('version', '?')}, {r['machine']['cores']} cores, "
                 f"{r['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_marked_section(path: Path, markdown: str) -> None:
    """Replace the text between the bench markers in `path` with `markdown`; append the markers where missing."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN}\n{markdown.strip()}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if (start == -1) != (end == -1) or end < start or text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError(f"{path}: the bench markers {BEGIN} ... {END} must appear once each, in that order")
    if start != -1:
        text = text[:start] + block + text[end + len(END):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
