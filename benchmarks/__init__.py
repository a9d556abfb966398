"""mae_fast's benchmark suite: every op and the MAE training step against their PyTorch peers.

Run it with ``mae-fast bench`` (or ``python -m benchmarks.run``); ``--smoke`` runs tiny shapes on the
CPU so the suite keeps working without a GPU (its numbers are not performance claims). On a GPU,
``benchmarks/gpu_check.sh OUTDIR`` builds, tests and benchmarks in one call.
"""
