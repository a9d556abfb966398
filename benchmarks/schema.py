"""The results file, written down as code: :func:`validate` raises ValueError listing every problem.

A results file is one JSON object::

    {"schema_version": 1, "environment": {...}, "ceilings": {"copy": {...}, "matmul": {...}},
     "config": {...}, "rows": [row, ...], "elapsed_s": float}

and each row names op, case, shape, dtype, provider, mode, status ("ok", "skipped", "mismatch",
"error"), the reason when not ok, median/p20/p80 ms, throughput (GB/s, TFLOP/s), the % of the ceilings
measured in the same run, and the speedup over every other timed provider of the same case and mode.
"""

from __future__ import annotations

import math

SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "mismatch", "error")
SECTIONS = ("kernels", "sweep", "train")
KINDS = ("kernel", "train_step")
MODES = ("fwd", "bwd", "fwd+bwd", "step")
ENVIRONMENT_KEYS = {
    "date": str,
    "device": str,
    "python": str,
    "torch": str,
    "git_commit": (str, type(None)),
    "smoke": bool,
    "claims": bool,
}
ROW_KEYS = {
    "kind": str,
    "section": str,
    "op": str,
    "case": str,
    "shape": dict,
    "dtype": str,
    "provider": str,
    "mode": str,
    "status": str,
    "reason": (str, type(None)),
    "median_ms": (float, type(None)),
    "p20_ms": (float, type(None)),
    "p80_ms": (float, type(None)),
    "speedup": dict,
    "max_abs_err": (float, type(None)),
    "tolerance": (float, type(None)),
}
OPTIONAL_NUMBERS = ("gbps", "pct_of_copy_bw", "tflops", "pct_of_matmul", "img_per_s", "peak_mem_gb", "compile_s")
TIMES = ("median_ms", "p20_ms", "p80_ms")
# What each kind of row measures: null in a row that was not timed.
MEASUREMENTS = {
    "kernel": (*TIMES, "bytes", "gbps", "pct_of_copy_bw", "flops", "tflops", "pct_of_matmul"),
    "train_step": (*TIMES, "img_per_s", "peak_mem_gb", "flops", "tflops", "pct_of_matmul", "compile_s"),
}


def make_row(kind: str, **fields) -> dict:
    """A row of ``kind`` with every key its benchmark writes but ``section`` (the runner's): ``fields``, and
    where they give none, null measurements, no reason, no correctness check, no timer and no speedups."""
    unset = dict.fromkeys((*MEASUREMENTS[kind], "reason", "max_abs_err", "tolerance", "timer"))
    return {"kind": kind, **unset, "speedup": {}, **fields}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_type(problems: list[str], where: str, value, expected) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return True
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        names = "/".join("null" if t is type(None) else t.__name__ for t in expected)
        problems.append(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
        return False
    return True


def _check_row(problems: list[str], index: int, row) -> None:
    where = f"rows[{index}]"
    if not isinstance(row, dict):
        problems.append(f"{where}: expected an object, got {type(row).__name__}")
        return
    for key, expected in ROW_KEYS.items():
        if key not in row:
            problems.append(f"{where}: missing {key!r}")
        else:
            _check_type(problems, f"{where}.{key}", row[key], expected)
    for key, allowed in (("kind", KINDS), ("section", SECTIONS), ("mode", MODES), ("status", STATUSES)):
        if key in row and row[key] not in allowed:
            problems.append(f"{where}.{key}: {row[key]!r} is not one of {allowed}")
    for key in OPTIONAL_NUMBERS:
        if row.get(key) is not None and not (_is_number(row[key]) and row[key] >= 0):
            problems.append(f"{where}.{key}: expected a non-negative number or null, got {row[key]!r}")
    shape = row.get("shape")
    if isinstance(shape, dict) and not all(isinstance(k, str) and _is_number(v) for k, v in shape.items()):
        problems.append(f"{where}.shape: expected names mapped to numbers, got {shape!r}")
    speedup = row.get("speedup")
    if isinstance(speedup, dict) and not all(
        isinstance(k, str) and _is_number(v) and v > 0 for k, v in speedup.items()
    ):
        problems.append(f"{where}.speedup: expected provider names mapped to positive numbers, got {speedup!r}")
    status = row.get("status")
    times = [row.get(k) for k in ("p20_ms", "median_ms", "p80_ms")]
    if status == "ok":
        if not all(_is_number(t) and t > 0 for t in times):
            problems.append(f"{where}: an ok row needs positive p20_ms, median_ms, p80_ms, got {times}")
        elif not times[0] <= times[1] <= times[2]:
            problems.append(f"{where}: expected p20_ms <= median_ms <= p80_ms, got {times}")
        if row.get("max_abs_err") is None:
            problems.append(f"{where}: an ok row must record its correctness check (max_abs_err)")
    elif status in STATUSES:
        if not row.get("reason"):
            problems.append(f"{where}: a {status} row must give its reason")
        if any(t is not None for t in times) or speedup:
            problems.append(f"{where}: a {status} row must not carry timings")
    if status == "ok" and isinstance(speedup, dict) and row.get("provider") in speedup:
        problems.append(f"{where}.speedup: a provider is compared with itself")


def validate(doc) -> None:
    """Raise ValueError naming every way ``doc`` departs from the results schema."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ValueError(f"results: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    env = doc.get("environment")
    if not isinstance(env, dict):
        problems.append("environment: missing or not an object")
    else:
        for key, expected in ENVIRONMENT_KEYS.items():
            if key not in env:
                problems.append(f"environment: missing {key!r}")
            else:
                _check_type(problems, f"environment.{key}", env[key], expected)
        if env.get("smoke") is True and env.get("claims") is True:
            problems.append("environment: a smoke run cannot make performance claims")
    ceilings = doc.get("ceilings")
    if not isinstance(ceilings, dict):
        problems.append("ceilings: missing or not an object")
    else:
        for name, unit in (("copy", "gbps"), ("matmul", "tflops")):
            entry = ceilings.get(name)
            if not isinstance(entry, dict) or not (_is_number(entry.get(unit)) and entry[unit] > 0):
                problems.append(f"ceilings.{name}.{unit}: expected a positive number")
            elif not all(_is_number(entry.get(k)) for k in ("median_ms", "p20_ms", "p80_ms")):
                problems.append(f"ceilings.{name}: expected median_ms, p20_ms and p80_ms")
    if not isinstance(doc.get("config"), dict):
        problems.append("config: missing or not an object")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        problems.append("rows: missing or not a list")
    else:
        for index, row in enumerate(rows):
            _check_row(problems, index, row)
    if not _is_number(doc.get("elapsed_s")):
        problems.append("elapsed_s: expected a number")
    if problems:
        raise ValueError("invalid benchmark results:\n  " + "\n  ".join(problems))
