"""The ``mae-fast`` command line (also ``python -m mae_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``mae-fast info`` stays light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("mae_fast.info", "print versions, the GPU, the extension and the backend each op would use"),
    "bench": ("mae_fast.bench", "benchmark every op and the training step against their PyTorch peers"),
    "pretrain": ("mae_fast.train.cli", "MAE pretraining (--demo: the README's demo on the embedded data)"),
    "visualize": ("mae_fast.train.visualize", "reconstruction grid of a pretrained MAE for image files"),
    "eval": ("mae_fast.train.eval", "kNN or linear-probe accuracy of a pretrained encoder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description="Fast MAE pretraining of Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module_name).run(args)


if __name__ == "__main__":
    sys.exit(main())
