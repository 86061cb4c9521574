"""Diagnostic figures from a run folder's ``metrics.jsonl``: is training balanced?

One column of panels per run: per-head accuracy (train dashed, val solid), mean logit norm
per head, the coefficients with OLM's target ratios, OLM's gains G and C (rate target), and
which head receives OLM's target mass over time (each epoch's mean ratios as shares, with
the share of steps saturated on each head). Methods that log no OLM diagnostics simply have
no lines in those panels.

    python -m utils.plot runs/AVDigits-olm-bilinear-s0            # -> RUN/diagnostics.png
    python -m utils.plot runs/joint-s0 runs/olm-s0 --out both.png # side by side
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from utils.errors import UserError

PANEL_TITLES = ("accuracy (train dashed, val solid)", "mean logit norm ||z|| (train dashed, val solid)",
                "coefficients (solid), OLM target ratio r (dashed)", "OLM gains G (solid), C (dashed)",
                "OLM target mass by head (shaded), steps saturated on it (dotted)")
KNOWN_HEAD_COLOURS = {"audio": "tab:blue", "visual": "tab:orange", "fusion": "tab:green", "text": "tab:red"}
SPARE_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir} (is it a run folder of main.py?)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not valid JSON (truncated or edited file?)") from None
    if not rows:
        raise UserError(f"{path} has no epochs yet")
    return rows


def run_label(run_dir: Path) -> str:
    """'<method> s<seed>' from results.json or config.yaml, else the folder's name."""
    import yaml

    for name in ("results.json", "config.yaml"):
        path = Path(run_dir) / name
        try:
            values = yaml.safe_load(path.read_text())  # JSON is YAML too
            return f"{values['method']} s{values['seed']} ({Path(run_dir).name})"
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue  # a missing or malformed file only costs the label
    return Path(run_dir).name


def head_colours(heads: Sequence[str]) -> dict[str, str]:
    spare = iter(SPARE_COLOURS * 4)
    return {h: KNOWN_HEAD_COLOURS.get(h) or next(spare) for h in heads}


def grouped_bars(axis, labels: Sequence[str], groups: dict[str, dict[str, tuple[float, float]]],
                 colours: dict[str, str]) -> list[float]:
    """One bar per label (x) and group (colour) with its mean ± std (``groups[group][label]``; a
    label a group lacks gets no bar); returns the bars' tops (mean + std)."""
    width = 0.8 / max(len(groups), 1)
    tops = []
    for i, (group, values) in enumerate(groups.items()):
        present = [(x, values[label]) for x, label in enumerate(labels) if label in values]
        axis.bar([x + (i - (len(groups) - 1) / 2) * width for x, _ in present], [m for _, (m, _) in present], width,
                 yerr=[s for _, (_, s) in present], capsize=2, color=colours[group], label=group)
        tops += [m + s for _, (m, s) in present]
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    return tops


def series(rows: list[dict], *keys: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of rows[...][k1][k2]... where the value is present."""
    epochs, values = [], []
    for row in rows:
        value = row
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            epochs.append(row["epoch"])
            values.append(float(value))
    return epochs, values


def heads_of(rows: list[dict]) -> list[str]:
    heads: list[str] = []
    for row in rows:
        for head in row.get("train", {}):
            if head not in heads:
                heads.append(head)
    return heads


def draw(axis, points: tuple[list[int], list[float]], style: dict) -> None:
    """Plot a curve only when it has points, so absent diagnostics leave no legend entry."""
    if points[0]:
        axis.plot(*points, **style)


def draw_run(axes, rows: list[dict], label: str) -> None:
    """Fill one column of four panels with one run's curves."""
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    heads = heads_of(rows)
    colours = head_colours(heads)
    accuracy, norm, coefficient, gains, mass = axes
    for head in heads:
        style = dict(color=colours[head], marker="o", ms=3, label=head)
        dashed = dict(color=colours[head], ls="--", marker="x", ms=3, alpha=0.75)
        draw(accuracy, series(rows, "val", head, "acc"), style)
        draw(accuracy, series(rows, "train", head, "acc"), dashed)
        draw(norm, series(rows, "val", head, "norm"), style)
        draw(norm, series(rows, "train", head, "norm"), dashed)
        draw(coefficient, series(rows, "coefficients", head), style)
        draw(coefficient, series(rows, "olm", "ratios", head), dashed)
        draw(gains, series(rows, "olm", "G", head), style)
        draw(gains, series(rows, "olm", "C", head), dashed)
    accuracy.set_title(f"{label}\n{PANEL_TITLES[0]}", fontsize=9)
    for axis, title in zip(axes[1:], PANEL_TITLES[1:]):
        axis.set_title(title, fontsize=9)
    _, saturated = series(rows, "olm", "saturated")
    if saturated:
        share = sum(saturated) / len(saturated)
        gains.set_title(f"{PANEL_TITLES[3]}; saturated steps {100 * share:.0f}%", fontsize=9)
    else:
        gains.text(0.5, 0.5, "no G/C logged\n(not OLM's rate target)", ha="center", va="center",
                   transform=gains.transAxes, fontsize=8, color="gray")
    draw_mass(mass, rows, heads, colours)
    accuracy.set_ylim(-0.02, 1.02)
    # Fusion norms can be orders of magnitude above the unimodal ones (bilinear fusion).
    norm_values = [v for line in norm.get_lines() for v in line.get_ydata()]
    if norm_values and min(norm_values) > 0:
        norm.set_yscale("log")
        norm.yaxis.set_major_formatter(ScalarFormatter())
        norm.yaxis.set_minor_formatter(NullFormatter())
    epochs = [row["epoch"] for row in rows]
    for axis in axes:
        # Half an epoch of margin keeps integer ticks even when only one epoch is logged.
        axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")


def draw_mass(axis, rows: list[dict], heads: list[str], colours: dict[str, str]) -> None:
    """Stacked shares of each epoch's mean target ratios (who receives the target mass), and
    per head the share of that epoch's steps whose target was one-hot on it."""
    epochs, shares = [], {h: [] for h in heads}
    for row in rows:
        ratios = (row.get("olm") or {}).get("ratios") or {}
        total = sum(ratios.get(h, 0.0) for h in heads)
        if total > 0:
            epochs.append(row["epoch"])
            for head in heads:
                shares[head].append(ratios.get(head, 0.0) / total)
    if not epochs:
        axis.text(0.5, 0.5, "no target ratios logged\n(not OLM)", ha="center", va="center",
                  transform=axis.transAxes, fontsize=8, color="gray")
        return
    axis.stackplot(epochs, *[shares[h] for h in heads], colors=[colours[h] for h in heads], alpha=0.45,
                   labels=[f"{h} mass" for h in heads])
    for head in heads:
        draw(axis, series(rows, "olm", "saturated_head", head),
             dict(color=colours[head], ls=":", marker=".", lw=1.5, label=f"saturated on {head}"))
    axis.set_ylim(0, 1)


def plot_runs(run_dirs: Sequence[Path | str], out: Path | str) -> Path:
    """One column of panels per run, side by side, saved as a PNG at ``out``."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder to plot")
    loaded = [(read_rows(d), run_label(d)) for d in run_dirs]
    plt = pyplot()
    columns = len(loaded)
    # Rows share their y axis so runs side by side compare at a glance.
    figure, axes = plt.subplots(len(PANEL_TITLES), columns, figsize=(4.6 * columns, 13.5), squeeze=False,
                                sharey="row")
    for column, (rows, label) in enumerate(loaded):
        draw_run(axes[:, column], rows, label)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_run(run_dir: Path | str) -> Path:
    """Write ``run_dir/diagnostics.png`` and return its path (main.py calls this per run)."""
    return plot_runs([run_dir], Path(run_dir) / "diagnostics.png")


def default_output(run_dirs: Sequence[Path]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / "diagnostics.png"
    return run_dirs[0].parent / "diagnostics-side-by-side.png"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Plot per-head accuracy, logit norms, coefficients/ratios and OLM's G and C "
                    "from run folders' metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by main.py")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/diagnostics.png for one run, "
                                      "diagnostics-side-by-side.png beside the first run for several)")
    args = parser.parse_args(argv)
    run_dirs = [Path(d) for d in args.run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"run folder {run_dir} does not exist")
    out = plot_runs(run_dirs, Path(args.out) if args.out else default_output(run_dirs))
    print(f"wrote {out}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
