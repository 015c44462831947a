"""Teacher update: mtdist's fused in-place EMA vs the authors' per-parameter loop, ResNet-152 shapes.

Both are timed in the same run on the same tensors, next to the machine's memory-copy bandwidth
for the same bytes. An EMA update reads the teacher and the student and writes the teacher
(3 x model bytes); a copy reads and writes once (2 x model bytes).

    .venv/bin/python benchmarks/ema.py [--arch resnet152] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet152")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    student = build_model(args.arch, 1000, two_heads=True).to(device)
    flatten_parameters_(student)  # as mtdist.train does before handing the student to DeepSpeed
    teacher = Teacher(
        build_model(args.arch, 1000, two_heads=True).to(device), decay=0.9997, autocast_dtype=None
    )
    teacher.updates = 10**6  # past the warm-up: the steady-state decay
    t_params, s_params = list(teacher.module.parameters()), [p.detach() for p in student.parameters()]
    n_bytes = sum(p.numel() * p.element_size() for p in t_params)
    flat_src = torch.empty(n_bytes // 4, device=device)
    flat_dst = torch.empty_like(flat_src)

    fused = median_seconds(lambda: teacher.update(student), args.repeats, device)
    loop = median_seconds(lambda: authors_update(t_params, s_params, 0.9997), args.repeats, device)
    copy = median_seconds(lambda: flat_dst.copy_(flat_src), args.repeats, device)
    copy_bw = 2 * n_bytes / copy
    fused_bw = 3 * n_bytes / fused
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {device}, torch {torch.__version__}"
    )
    print(f"{args.arch}: {len(t_params)} tensors, {n_bytes / 2**20:.0f} MiB fp32")
    print(f"fused teacher update   {fused * 1e3:8.2f} ms  {fused_bw / 1e9:6.1f} GB/s")
    print(f"authors' loop          {loop * 1e3:8.2f} ms")
    print(f"memory copy, same bytes{copy * 1e3:8.2f} ms  {copy_bw / 1e9:6.1f} GB/s")
    print(
        f"ratio loop / fused: {loop / fused:.2f}x; fused reaches {fused_bw / copy_bw:.0%} of copy bandwidth"
    )


if __name__ == "__main__":
    main()
