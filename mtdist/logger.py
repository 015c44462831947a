"""Rank-0 metrics: a JSONL file in the run folder, and W&B (offline by default, no key needed).

Other ranks get a logger that does nothing, so call sites never test the rank. wandb is
imported here only. Metric names are grouped by prefix (train/, eval/student/, eval/teacher/,
data/, system/), all against the optimizer step: W&B's default dashboard shows one panel section
per first segment (train, eval, data, system), and eval/student and eval/teacher get their own
when the workspace groups by all segments.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mtdist")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a") if enabled else None
        self._wandb: Any = None

    def start_wandb(
        self, mode: str, project: str, run_id: str, config: dict[str, Any], run_dir: Path
    ) -> None:
        """Continue run `run_id` (resume='allow'): a resumed job writes to the same W&B run."""
        if not self.enabled or mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=config,
            name=run_dir.name,
        )
        self._wandb.define_metric("step")
        self._wandb.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line (and one W&B row): the optimizer step, wall time, and float metrics."""
        if self._file is None:
            return
        row = {"step": step, "time": round(time.time(), 3)} | {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "time"})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def new_run_id() -> str:
    """A W&B-style run id; created once per run and then kept in every checkpoint."""
    return os.urandom(4).hex()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
