"""All benchmarks in one command, each printing ratios of two things measured side by side in one run.

    .venv/bin/python -m benchmarks            # or: make bench   (about 2.5 minutes on 2 CPU cores)
    .venv/bin/python -m benchmarks --only ema,step

(a) ema: the fused teacher update vs the authors' per-parameter loop and vs a memory copy
(b) data: the two-view input pipeline vs a naive Pillow one (benchmarks/data.py)
(c, d) step: a full mtdist step vs a bare hand-written one; Mean Teacher vs supervised-only
(e) checkpoint: save and load time against model size
The figures are recorded in benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

DATA_GOAL = 2.0  # issue 6 (b): the two-view pipeline at least 2x a naive Pillow one, images/s per core
SECTIONS = ("ema", "data", "step", "checkpoint")
DATA_ENTRY_POINTS = ("run", "measure", "benchmark", "results", "run_benchmark")


def machine_line() -> str:
    """CPU model, cores and load average: the figures mean nothing without them."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {model}, {os.cpu_count()} cores, load average {load}"


def data_entry_point(module: Any) -> Callable[[], dict[str, Any]] | None:
    return next((getattr(module, n) for n in DATA_ENTRY_POINTS if callable(getattr(module, n, None))), None)


def data_ratios(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The data benchmark's own "ratios" list if it has one, else every numeric key naming a ratio;
    the goal applies to the one named exactly "ratio" (the others are variants, for information)."""
    if "ratios" in res:
        return list(res["ratios"])
    out = []
    for key, value in res.items():
        if isinstance(value, (int, float)) and ("ratio" in key or "speedup" in key):
            goal = key == "ratio"
            out.append(
                {
                    "name": f"(b) data pipeline {key.replace('_', ' ')} (images/s)",
                    "value": value,
                    "goal": f">= {DATA_GOAL}" if goal else "(variant)",
                    "met": value >= DATA_GOAL if goal else None,
                }
            )
    return out


def run_data() -> tuple[list[str], list[dict[str, Any]]]:
    """benchmarks/data.py (written separately); "missing" only when that module itself is absent."""
    try:
        module = importlib.import_module("benchmarks.data")
    except ModuleNotFoundError as err:
        if err.name != "benchmarks.data":
            raise
        return ["  missing: benchmarks/data.py is not there"], []
    entry = data_entry_point(module)
    if entry is None:
        return [f"  benchmarks/data.py has none of {', '.join(DATA_ENTRY_POINTS)}()"], []
    res = entry()
    if hasattr(module, "report_lines"):
        lines = list(module.report_lines(res))
    else:
        lines = [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in res.items()]
    return lines, data_ratios(res)


def run_section(name: str) -> tuple[list[str], list[dict[str, Any]]]:
    if name == "data":
        return run_data()
    module = importlib.import_module(f"benchmarks.{name}")
    res = module.run()
    return module.report_lines(res), res["ratios"]


def ratio_table(ratios: list[dict[str, Any]]) -> list[str]:
    lines = ["ratios (each of two things measured side by side in this run):"]
    for r in ratios:
        verdict = {True: "met", False: "MISSED", None: ""}[r["met"]]
        lines.append(f"  {r['name']:<58} {r['value']:7.3f}   goal {r['goal']}  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    print(machine_line(), flush=True)
    ratios: list[dict[str, Any]] = []
    start = time.perf_counter()
    threads = torch.get_num_threads()
    for name in names:
        torch.set_num_threads(threads)  # a section may narrow it (data measures one core)
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        lines, found = run_section(name)
        print("\n".join(lines))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        ratios += found
    print()
    print("\n".join(ratio_table(ratios)))
    print(f"\n{machine_line()} (at the end); total {time.perf_counter() - start:.0f} s")
