"""The ``kiln`` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.models, threads=args.threads, repeat=args.repeat)


def _cmd_explain(args) -> int:
    from .modelref import load_model

    import kiln

    model, inputs = load_model(args.model)
    print(kiln.explain(model, inputs))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: a deep-learning compiler for PyTorch and ONNX models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    d = sub.add_parser("demo", help="compile the built-in example models and compare with eager PyTorch")
    d.add_argument("models", nargs="*", default=["resnet18", "bert", "lstm"],
                   help="example models (resnet18, resnet50, bert, hf_bert, lstm, gru)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--repeat", type=int, default=10, help="timed runs per model (median reported)")
    d.set_defaults(fn=_cmd_demo)
    e = sub.add_parser("explain", help="list the ops of a model that fall back to PyTorch, and why")
    e.add_argument("model", help="an example model name, an ONNX file, or package.module:factory")
    e.set_defaults(fn=_cmd_explain)
    args = p.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"kiln {__version__}")
        return 0
    if not getattr(args, "fn", None):
        p.print_help()
        return 0
    from .errors import KilnError

    try:
        return args.fn(args)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
