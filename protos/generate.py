"""Generate the Python code for protos/*.proto: `python -m protos.generate [--out DIR]` (default: protos/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted(p.relative_to(HERE).as_posix() for p in HERE.rglob("*.proto"))  # attnserve/v1/attnserve.proto


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    # Generated from the repo root so the stubs import each other as `protos.X_pb2`.
    args = ["protoc", f"-I{HERE.parent}", f"-I{include}", f"--python_out={out.parent}", f"--pyi_out={out.parent}",
            f"--grpc_python_out={out.parent}"] + [f"{HERE.name}/{p}" for p in PROTOS]
    if out.name != HERE.name:
        raise ValueError("the output folder must be named 'protos'")
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(out.rglob("*_pb2*.py*"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
