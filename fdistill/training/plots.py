"""Training curves of a run as one PNG (``fdistill plot RUN_DIR``; also written at the end of every run).

One panel per scalar name read from ``run_dir/metrics.jsonl``: the phases of a method (``critic/loss``,
``student/loss``) share the panel of their name (``loss``); each evaluation metric (``eval/<metric>``) has its own.
Panels come in the order loss, evaluation metrics, learning rate, gradient norm, then the method's other scalars.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

CURVES_FILENAME = "curves.png"
NOT_PLOTTED = ("step", "steps_per_sec", "samples_per_sec")
PANEL_ORDER = ("loss", "eval", "lr", "grad_norm")  # then the rest, alphabetically
LOG_SCALE_SPREAD = 100.0  # a positive curve spanning more than this factor is drawn on a log axis
COLUMNS = 3
MARKED_POINTS = 50  # curves with this few points get a marker on each (a single logged step stays visible)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a last row cut by a kill is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def panel_of(key: str) -> str:
    """The panel a scalar is drawn in: ``eval/<metric>`` its own, any other its last name component."""
    return key if key.startswith("eval/") else key.rsplit("/", 1)[-1]


def curves(rows: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {key: (steps, values)}} from metrics rows, panels in display order; null (non-finite) values skipped."""
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in NOT_PLOTTED or not isinstance(value, (int, float)):
                continue
            steps, values = panels.setdefault(panel_of(key), {}).setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))

    def rank(panel: str) -> tuple[int, str]:
        group = "eval" if panel.startswith("eval/") else panel
        return (PANEL_ORDER.index(group) if group in PANEL_ORDER else len(PANEL_ORDER), panel)

    return {panel: panels[panel] for panel in sorted(panels, key=rank)}


def wants_log_scale(values: list[float]) -> bool:
    """Positive values spanning more than LOG_SCALE_SPREAD (a loss falling by orders of magnitude)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPREAD


def write_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Draw ``curves(read_metrics(metrics_path))`` into ``out_path`` (PNG, matplotlib without a display); returns
    the path, or None when there is nothing to draw (no metrics file or no rows)."""
    from matplotlib.figure import Figure

    metrics_path = Path(metrics_path)
    panels = curves(read_metrics(metrics_path)) if metrics_path.exists() else {}
    if not panels:
        return None
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (panel, series) in zip(axes, panels.items()):
        for key, (steps, values) in series.items():
            ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if len(steps) <= MARKED_POINTS else None,
                    markersize=3)
        if wants_log_scale([v for _, values in series.values() for v in values]):
            ax.set_yscale("log")
        ax.set_title(panel if len(series) > 1 else next(iter(series)))  # one curve: its full name
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(str(metrics_path.parent))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path
