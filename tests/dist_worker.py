"""Run under torchrun by the tests: the real build_run + train_loop, then dump per-rank state.

Writes <out>/rank<r>.pt with the teacher and student state, the teacher update count and the
engine's optimizer step count, so the test can compare ranks bitwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from mtdist.config import load_config
from mtdist.ema import flat_view
from mtdist.train import build_run, final_results, train_loop


def main(config: str, out: str, overrides: list[str]) -> None:
    run = build_run(load_config(config, overrides))
    train_loop(run)
    results = final_results(run)
    state = {
        "teacher": {k: v.clone() for k, v in run.teacher.module.state_dict().items()},
        "student": {k: v.clone() for k, v in run.engine.module.state_dict().items()},
        "teacher_updates": run.teacher.updates,
        "global_steps": run.engine.global_steps,
        "total_steps": run.plan.total_steps,
        "student_flat": flat_view(list(run.engine.module.parameters())) is not None,
        "results": results,
    }
    torch.save(state, Path(out) / f"rank{torch_dist.get_rank()}.pt")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
