"""The ``mae-fast`` command line (also ``python -m mae_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Only the selected subcommand's module is imported (to add its options and to run it): ``mae-fast info``
stays light, and a subcommand that cannot work in this install (``bench`` outside a source checkout)
fails on its own without taking the others down. ``mae-fast --help`` lists every subcommand from the
table below, importing none of them.
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
    "finetune": ("mae_fast.train.finetune", "fine-tune a pretrained encoder (--demo: pretrained vs scratch)"),
}


def selected_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` selects: its first argument when that names one (the top-level parser has
    no options but ``-h``, so a subcommand can only come first), else None."""
    return argv[0] if argv and argv[0] in SUBCOMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser listing every subcommand; only ``command``'s module is imported, to add its options."""
    parser = argparse.ArgumentParser(prog="mae-fast", description="Fast MAE pretraining of Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(selected_command(argv)).parse_args(argv)
    code = importlib.import_module(args.module_name).run(args)
    distributed = sys.modules.get("mae_fast.train.distributed")  # imported only by a subcommand that trains
    if distributed is not None:
        distributed.exit_if_a_group_outlived(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
