"""``mae-fast bench``: the benchmark suite of ``benchmarks/`` (kernels and training step vs their peers).

The suite lives in the source checkout (``benchmarks/`` next to ``mae_fast/``), not in the installed
package; this command finds it there. ``--smoke`` runs tiny shapes on the CPU (numbers are not claims).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def _suite_path() -> None:
    if not (CHECKOUT / "benchmarks" / "run.py").is_file():
        raise SystemExit(
            f"mae-fast bench needs a source checkout of mae_fast (benchmarks/ next to mae_fast/); "
            f"none found at {CHECKOUT}. Install with `pip install -e .` from a clone."
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _suite_path()
    from benchmarks import options

    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    _suite_path()
    from benchmarks import run as suite

    return suite.run(args)
