"""The `attnserve` command: one subcommand per step of the flow, each importing only what it needs.

`serve`, `generate`, `predict` and `models` must run where torch is not installed, so no subcommand's imports
happen before it is chosen.
"""

from __future__ import annotations

import sys

USAGE = """usage: attnserve COMMAND [ARGS]

commands:
  train      train a model on a built-in task or a TSV corpus (needs the 'train' extra)
  evaluate   held-out exact match of a checkpoint (needs the 'train' extra)
  import-hf  a Marian (opus-mt) model folder saved by transformers -> checkpoint (needs the 'export' extra)
  export     checkpoint -> validated ONNX version in a model repository (needs the 'export' extra)
  inspect    list the attention blocks of an exported version
  serve      run the gRPC server on a model repository
  generate   stream one generation from a server, optionally with attention and a heatmap
  predict    one unary prediction from a server
  models     list the models a server holds
  bench      load a server with concurrent streams, level by level, against the model's own cost

`attnserve COMMAND --help` for each command's options.
"""


def _train(argv: list[str]) -> int:
    from model_src.train import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from model_src.evaluate import main

    return main(argv)


def _import_hf(argv: list[str]) -> int:
    from model_src.marian import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from export.cli import export_main

    return export_main(argv)


def _inspect(argv: list[str]) -> int:
    from export.cli import inspect_main

    return inspect_main(argv)


def _serve(argv: list[str]) -> int:
    from serving.cli import serve_main

    return serve_main(argv)


def _bench(argv: list[str]) -> int:
    from bench.cli import main

    return main(argv)


def _client(name: str):
    def run(argv: list[str]) -> int:
        from serving.client import cli as client_cli

        return getattr(client_cli, f"{name}_main")(argv)

    return run


COMMANDS = {
    "train": _train, "evaluate": _evaluate, "import-hf": _import_hf, "export": _export, "inspect": _inspect,
    "serve": _serve,
    "generate": _client("generate"), "predict": _client("predict"), "models": _client("models"), "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"attnserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
