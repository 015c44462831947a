"""Teacher update: mtdist's fused in-place EMA vs the authors' per-parameter loop, ResNet-152 shapes.

Both are timed in the same run on the same tensors, next to the machine's memory-copy bandwidth
for the same bytes. An EMA update reads the teacher and the student and writes the teacher
(3 x model bytes); a copy reads and writes once (2 x model bytes). For scale, the optimizer step
that precedes each update is timed too (SGD with Nesterov momentum and weight decay over the same
student), with torch's fused kernel (what mtdist uses) and with foreach.

    .venv/bin/python benchmarks/ema.py [--arch resnet152] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mtdist.ema import Teacher, flatten_parameters_
from mtdist.models import build_model


def authors_update(teacher: list[torch.Tensor], student: list[torch.Tensor], alpha: float) -> None:
    """The authors' update_ema_variables: one mul_ and one add_ per parameter tensor."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(alpha).add_(s, alpha=1 - alpha)


def median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgd_step_seconds(
    params: list[torch.Tensor], kernel: dict[str, bool], repeats: int, device: torch.device
) -> float:
    """One SGD step (Nesterov, weight decay: the paper's) over `params`, whose .grad is set."""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, **kernel)
    return median_seconds(opt.step, repeats, device)


def run(arch: str = "resnet152", repeats: int = 20, threads: int = 0) -> dict[str, Any]:
    """Time the three side by side; returns the figures and the two ratios of issue 6 (a)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    student = build_model(arch, 1000, two_heads=True).to(device)
    flatten_parameters_(student)  # as mtdist.train does before handing the student to DeepSpeed
    teacher = Teacher(build_model(arch, 1000, two_heads=True).to(device), decay=0.9997, autocast_dtype=None)
    teacher.updates = 10**6  # past the warm-up: the steady-state decay
    t_params, s_params = list(teacher.module.parameters()), [p.detach() for p in student.parameters()]
    n_bytes = sum(p.numel() * p.element_size() for p in t_params)
    flat_src = torch.empty(n_bytes // 4, device=device)
    flat_dst = torch.empty_like(flat_src)

    fused = median_seconds(lambda: teacher.update(student), repeats, device)
    loop = median_seconds(lambda: authors_update(t_params, s_params, 0.9997), repeats, device)
    copy = median_seconds(lambda: flat_dst.copy_(flat_src), repeats, device)
    student_params = list(student.parameters())
    for p in student_params:
        p.grad = torch.randn_like(p)
    sgd_fused = sgd_step_seconds(student_params, {"fused": True}, repeats, device)
    sgd_foreach = sgd_step_seconds(student_params, {"foreach": True}, repeats, device)
    copy_bw, fused_bw = 2 * n_bytes / copy, 3 * n_bytes / fused
    return {
        "setup": (
            f"{arch}: {len(t_params)} tensors, {n_bytes / 2**20:.0f} MiB fp32; "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"device {device}, torch {torch.__version__}, median of {repeats}"
        ),
        "fused_ms": fused * 1e3,
        "loop_ms": loop * 1e3,
        "copy_ms": copy * 1e3,
        "sgd_fused_ms": sgd_fused * 1e3,
        "sgd_foreach_ms": sgd_foreach * 1e3,
        "fused_GBps": fused_bw / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "ratios": [
            {
                "name": "(a) authors' loop / fused update (time)",
                "value": loop / fused,
                "goal": ">= 1.6",
                "met": loop / fused >= 1.6,
            },
            {
                "name": "(a) fused update / memcpy (bandwidth)",
                "value": fused_bw / copy_bw,
                "goal": ">= 0.90",
                "met": fused_bw / copy_bw >= 0.9,
            },
            {
                "name": "(a) context: SGD step foreach / fused kernel (time)",
                "value": sgd_foreach / sgd_fused,
                "goal": "(mtdist uses fused)",
                "met": None,
            },
        ],
    }


def report_lines(res: dict[str, Any]) -> list[str]:
    return [
        f"  {res['setup']}",
        f"  fused teacher update    {res['fused_ms']:8.2f} ms  {res['fused_GBps']:6.1f} GB/s",
        f"  authors' loop           {res['loop_ms']:8.2f} ms",
        f"  memory copy, same bytes {res['copy_ms']:8.2f} ms  {res['copy_GBps']:6.1f} GB/s",
        f"  SGD step, fused kernel  {res['sgd_fused_ms']:8.2f} ms  (the step before each update)",
        f"  SGD step, foreach       {res['sgd_foreach_ms']:8.2f} ms",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet152")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    res = run(args.arch, args.repeats, args.threads)
    print("\n".join(report_lines(res)))
    for r in res["ratios"]:
        print(f"  {r['name']}: {r['value']:.2f} (goal {r['goal']})")


if __name__ == "__main__":
    main()
