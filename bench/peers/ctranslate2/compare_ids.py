"""attnserve's greedy token ids on the peer's check texts, against the ids the peer run wrote (ct2_tokens.json).

    python -m bench.peers.ctranslate2.compare_ids OUT/ct2_tokens.json models/opus-fp32/1 models/opus-int8/1

Decodes the same texts with each exported version's graphs (ONNX Runtime, greedy, the same new-token cap) and
prints, per version, how many sequences are identical to transformers', to CTranslate2 fp32's and int8's, and
to the first version's (e.g. int8 against fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.ctranslate2.compare_ids", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokens", type=Path, help="ct2_tokens.json from bench.peers.ctranslate2.run")
    p.add_argument("versions", type=Path, nargs="+", help="attnserve version folders of the same model")
    args = p.parse_args(argv)
    from export.validate import ort_greedy, session
    from model_repository import open_version
    from model_repository.tokenizer import load_tokenizer

    peer = json.loads(args.tokens.read_text(encoding="utf-8"))
    others = {"transformers": peer["reference"]["ids"], "CTranslate2 fp32": peer.get("ct2_fp32"),
              "CTranslate2 int8": peer.get("ct2_int8")}
    first = None
    for version in args.versions:
        manifest = open_version(version)
        tok = load_tokenizer(manifest.file(manifest.tokenizer))
        sessions = {g: session(manifest.file(manifest.graphs[g].file)) for g in ("encoder", "decoder")}
        sources = [tok.encode(t) for t in peer["texts"]]
        ids = ort_greedy(sessions, manifest.model_config, sources, peer["max_new_tokens"])
        n = len(ids)
        line = [f"{version} ({manifest.precision})"]
        for name, theirs in [*others.items(), *([("first version", first)] if first is not None else [])]:
            if theirs is not None:
                line.append(f"{name} {sum(a == b for a, b in zip(ids, theirs, strict=True))}/{n}")
        print(": ".join(line[:1]) + ": " + ", ".join(line[1:]))
        first = first if first is not None else ids
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
