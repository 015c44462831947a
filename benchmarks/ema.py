"""Teacher update: mtdist's fused in-place EMA vs the authors' per-parameter loop, ResNet-152 shapes.

All are timed in one run on the same tensors, interleaved round by round (the order rotating),
each figure the median over rounds and each ratio the median of the per-round ratios, next to
the machine's memory-copy bandwidth for the same bytes. An EMA update reads the teacher and the
student and writes the teacher (3 x model bytes); a copy reads and writes once (2 x model bytes),
so a copy's writes also cost a read for ownership unless it streams past the cache, and the update
can show more than 100% of the copy's bandwidth counted this way. For scale, the optimizer step
that precedes each update is timed too (SGD with Nesterov momentum and weight decay over the same
student), with torch's fused kernel (what mtdist uses) and with foreach.

    .venv/bin/python -m benchmarks.ema [--arch resnet152] [--rounds 20] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

import torch

from benchmarks.step import interleaved_seconds_per_step, paired_ratio
from mtdist.ema import Teacher, flatten_parameters_
from mtdist.models import build_model


def authors_update(teacher: list[torch.Tensor], student: list[torch.Tensor], alpha: float) -> None:
    """The authors' update_ema_variables: one mul_ and one add_ per parameter tensor."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(alpha).add_(s, alpha=1 - alpha)


def sgd(params: list[torch.Tensor], kernel: dict[str, bool]) -> torch.optim.Optimizer:
    """SGD as the paper's (Nesterov momentum, weight decay) over `params`, whose .grad is set."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, **kernel)


def run(arch: str = "resnet152", rounds: int = 20, threads: int = 0) -> dict[str, Any]:
    """Time them interleaved, round by round; returns the figures and the two ratios of issue 6 (a)."""
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
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    params = list(student.parameters())  # the Parameters (with .grad), not s_params' detached views
    sgd_fused, sgd_foreach = sgd(params, {"fused": True}), sgd(params, {"foreach": True})
    # Interleaved (the order rotating each round), so that a burst of a shared machine's noise hits
    # all alike: timed one after the other, one slow second once made the fused update look 1.1x.
    times = interleaved_seconds_per_step(
        {
            "fused": lambda _: teacher.update(student),
            "loop": lambda _: authors_update(t_params, s_params, 0.9997),
            "copy": lambda _: flat_dst.copy_(flat_src),
            "sgd_fused": lambda _: sgd_fused.step(),
            "sgd_foreach": lambda _: sgd_foreach.step(),
        },
        device,
        rounds=rounds,
        steps_per_round=1,
        warmup_steps=1,
    )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    # bandwidth ratio (3 n / t_fused) / (2 n / t_copy), from the per-round time ratios
    fused_vs_copy_bw = 1.5 * paired_ratio(times, "copy", "fused")
    return {
        "setup": (
            f"{arch}: {len(t_params)} tensors, {n_bytes / 2**20:.0f} MiB fp32; "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"device {device}, torch {torch.__version__}, {rounds} interleaved rounds, medians"
        ),
        **{f"{name}_ms": value for name, value in ms.items()},
        "fused_GBps": 3 * n_bytes / ms["fused"] / 1e6,
        "copy_GBps": 2 * n_bytes / ms["copy"] / 1e6,
        "ratios": [
            _ratio("(a) authors' loop / fused update (time)", paired_ratio(times, "loop", "fused"), 1.6),
            _ratio("(a) fused update / memcpy (bandwidth)", fused_vs_copy_bw, 0.9),
            {
                "name": "(a) context: SGD step foreach / fused kernel (time)",
                "value": paired_ratio(times, "sgd_foreach", "sgd_fused"),
                "goal": "(mtdist uses fused)",
                "met": None,
            },
        ],
    }


def _ratio(name: str, value: float, at_least: float) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": f">= {at_least}", "met": value >= at_least}


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
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    res = run(args.arch, args.rounds, args.threads)
    print("\n".join(report_lines(res)))
    for r in res["ratios"]:
        print(f"  {r['name']}: {r['value']:.2f} (goal {r['goal']})")


if __name__ == "__main__":
    main()
