"""`mtdist report RUN_DIR`: PNG plots of a run's metrics.jsonl, each against the optimizer step.

One PNG per topic in RUN_DIR/report/: the loss terms, the consistency weight, the learning rate,
the teacher's EMA decay, student vs teacher top-1 / top-5, and images/s. A topic whose metrics
the run never logged (a supervised-only run has no consistency weight) is skipped with a note.
A resumed run logs some steps twice; the later value wins. matplotlib's Figure is used without
pyplot, so no display and no global backend are involved.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mtdist.logger import read_metrics

Series = dict[str, tuple[list[int], list[float]]]


def _accuracy_names(k: int) -> tuple[str, ...]:
    """Periodic evaluation (eval/), and the final val/ and test/ points."""
    return tuple(
        f"{split}/{model}/top{k}" for split in ("eval", "val", "test") for model in ("student", "teacher")
    )


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    ylabel: str
    panels: tuple[tuple[str, tuple[str, ...]], ...]  # (panel title, metric names), one axis each
    alternatives: bool = False  # the names are alternatives (splits): do not list the absent ones


PLOTS: tuple[Plot, ...] = (
    Plot(
        "losses.png",
        "Loss terms (mean over each log interval)",
        "loss",
        (
            ("class (cross-entropy)", ("train/loss_class",)),
            ("consistency", ("train/loss_consistency",)),
            ("logit distance", ("train/loss_logit_distance",)),
            ("total (weighted sum)", ("train/loss_total",)),
        ),
    ),
    Plot("consistency_weight.png", "Consistency weight w(t)", "w(t)", (("", ("train/consistency_weight",)),)),
    Plot("lr.png", "Learning rate", "lr", (("", ("train/lr",)),)),
    Plot("ema_decay.png", "Teacher EMA decay", "decay", (("", ("train/ema_decay",)),)),
    Plot(
        "accuracy.png",
        "Student vs teacher accuracy",
        "accuracy (%)",
        tuple((f"top-{k}", _accuracy_names(k)) for k in (1, 5)),
        alternatives=True,
    ),
    Plot("images_per_s.png", "Training throughput (all ranks)", "images/s", (("", ("data/images_per_s",)),)),
)


def load_series(run_dir: Path) -> Series:
    """metric -> (steps, values), sorted by step; for a step logged twice the later row wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: RUN_DIR must be a run folder written by `mtdist train` (logging.run_dir)"
        )
    try:
        rows = read_metrics(run_dir)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} line {_first_bad_line(path)}: not JSON ({err.msg}); a run killed mid-write leaves a "
            "truncated last line: delete that line"
        ) from None
    by_metric: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                by_metric.setdefault(key, {})[step] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_metric.items()}


def _first_bad_line(path: Path) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            return number
    return 0


def _style(name: str, points: int) -> dict[str, object]:
    """Markers when there are few points; the teacher's hollow and larger, so equal values stay visible."""
    if points >= 30:
        return {"linestyle": "--"} if "/teacher/" in name else {}
    if "/teacher/" in name:
        return {"marker": "s", "markersize": 9, "markerfacecolor": "none", "linestyle": "--"}
    return {"marker": "o", "markersize": 4}


def _draw(plot: Plot, series: Series, out: Path) -> list[str]:
    """Write one PNG; returns the metric names drawn (empty: nothing to draw, no file written)."""
    from matplotlib.figure import Figure

    panels = [(title, [m for m in names if m in series]) for title, names in plot.panels]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return []
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.8 * rows), dpi=100, layout="constrained")
    fig.suptitle(plot.title)
    drawn = []
    for i, (title, names) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, label=name, **_style(name, len(steps)))
            drawn.append(name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(plot.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(out)
    return drawn


def write_report(run_dir: str | Path) -> list[str]:
    """Draw every plot the metrics allow into RUN_DIR/report/; one line per plot written or skipped."""
    run_dir = Path(run_dir)
    series = load_series(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    lines = []
    for plot in PLOTS:
        drawn = _draw(plot, series, out_dir / plot.file)
        wanted = [m for _, names in plot.panels for m in names]
        if drawn:
            missing = [] if plot.alternatives else [m for m in wanted if m not in drawn]
            note = f"; not logged: {', '.join(missing)}" if missing else ""
            lines.append(f"wrote {out_dir / plot.file} ({', '.join(drawn)}{note})")
        else:
            lines.append(f"skipped {plot.file}: none of {', '.join(wanted)} in {run_dir / 'metrics.jsonl'}")
    return lines
