"""The quantized model against fp32 on held-out inputs; export publishes nothing below the thresholds.

A task model (whose held-out pairs have targets) is judged by exact match: the quantized model may lose at most
`max_drop` of it. A model without targets (an imported Marian, a corpus with no task) is judged against fp32's own
outputs: the share of output positions holding the same token, and chrF of the decoded texts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validate import ValidationError, ort_greedy


@dataclass(frozen=True)
class QualityGate:
    max_drop: float = 0.005  # exact match, task models: at most half a point below fp32
    min_token_agreement: float = 0.80  # models without targets: positions holding fp32's token (one early
    # divergence shifts the rest: 86.5% for int8 on a random-weight opus-mt shape whose chrF against fp32 was 91.5)
    min_chrf: float = 90.0  # models without targets: chrF of the outputs against fp32's, 0-100


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Share of output positions (over the longer of each pair) where the two outputs hold the same token."""
    same = total = 0
    for a, b in zip(reference, candidate, strict=True):
        total += max(len(a), len(b), 1)
        same += sum(x == y for x, y in zip(a, b, strict=False)) if a or b else 1
    return same / total if total else 1.0


def chrf(reference: list[str], candidate: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(candidate, [reference]).score)


def _decode_all(sessions, cfg: dict, sources: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(sources), 64):
        out += ort_greedy(sessions, cfg, sources[i:i + 64], max_new_tokens)
    return out


def compare(fp32_sessions, q_sessions, cfg: dict, held: list[tuple[list[int], list[int]]], decode,
            max_new_tokens: int, scheme: str, gate: QualityGate) -> dict:
    """The quantized outputs against fp32's (and against targets where there are any); raises ValidationError
    when the gate refuses. `decode` turns output ids into text (for chrF)."""
    sources = [s for s, _ in held]
    ref = _decode_all(fp32_sessions, cfg, sources, max_new_tokens)
    got = _decode_all(q_sessions, cfg, sources, max_new_tokens)
    targets = [t for _, t in held]
    result = {"scheme": scheme, "inputs": len(held),
              "outputs_identical_to_fp32": sum(a == b for a, b in zip(ref, got, strict=True)) / len(held),
              "token_agreement": token_agreement(ref, got),
              "chrf_vs_fp32": chrf([decode(x) for x in ref], [decode(x) for x in got]), "gate": gate.__dict__}
    with_target = [i for i, t in enumerate(targets) if t]
    if with_target:
        fp32 = sum(ref[i] == targets[i] for i in with_target) / len(with_target)
        quant = sum(got[i] == targets[i] for i in with_target) / len(with_target)
        result |= {"exact_match_fp32": fp32, f"exact_match_{scheme}": quant, "judged_by": "exact match"}
        if fp32 - quant > gate.max_drop:
            raise ValidationError(f"{scheme} exact match {quant:.4f} is {fp32 - quant:.4f} below fp32 {fp32:.4f}, "
                                  f"more than --max-quality-drop {gate.max_drop}; not published")
        return result
    result["judged_by"] = "agreement with fp32"
    failed = []
    if result["token_agreement"] < gate.min_token_agreement:
        failed.append(f"token agreement with fp32 {result['token_agreement']:.4f} < --min-token-agreement "
                      f"{gate.min_token_agreement}")
    if result["chrf_vs_fp32"] < gate.min_chrf:
        failed.append(f"chrF against fp32 outputs {result['chrf_vs_fp32']:.1f} < --min-chrf {gate.min_chrf}")
    if failed:
        raise ValidationError(f"{scheme} outputs too far from fp32 on {len(held)} held-out inputs: "
                              + "; ".join(failed) + "; not published")
    return result
