"""``mae-fast bench``: the benchmark suite of ``benchmarks/`` (kernels and training step vs their peers).

The suite lives in the source checkout (``benchmarks/`` next to ``mae_fast/``), not in the installed
package; this command finds it there. In a regular (non-editable) install there is none: the command then
says what it needs on stderr and exits with status 2, and every other subcommand works as before.
``--smoke`` runs tiny shapes on the CPU (numbers are not claims).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
NO_CHECKOUT_STATUS = 2


def find_suite() -> str | None:
    """Put the checkout on sys.path for ``import benchmarks``; when there is no suite, say why (else None)."""
    if not (CHECKOUT / "benchmarks" / "run.py").is_file():
        return (
            f"mae-fast bench needs a source checkout of mae_fast: the benchmark suite benchmarks/ next to "
            f"mae_fast/, and there is none at {CHECKOUT} (a regular install does not ship it). Run it from a "
            f"clone installed with `pip install -e .`."
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    missing = find_suite()
    if missing is not None:
        parser.exit(NO_CHECKOUT_STATUS, missing + "\n")
    from benchmarks import options

    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    missing = find_suite()
    if missing is not None:
        print(missing, file=sys.stderr)
        return NO_CHECKOUT_STATUS
    from benchmarks import run as suite

    return suite.run(args)
