"""Rank-0 metrics: a JSONL file in the run folder, and optionally W&B.

Other ranks get a logger that does nothing, so call sites never test the rank.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mtdist")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a") if enabled else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line: the optimizer step, wall time, and float metrics."""
        if self._file is None:
            return
        row = {"step": step, "time": round(time.time(), 3)} | {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
