"""Our comparisons beside BalanceBenchmark's published numbers, each labelled as whose it is.

BalanceBenchmark (Xu, Cui, Huang, Wang, Hu, "BalanceBenchmark: A Survey for Multimodal
Imbalance Learning", arXiv:2502.10816; the results table of github.com/GeWu-Lab/BalanceBenchmark,
``images/Results.jpeg``) reports one test accuracy and macro-F1 per method and dataset. Its
datasets are not ours (the embedded sets are small and synthetic), so the report sets side by
side what can be compared: each method's fusion accuracy minus joint training's, ours per
comparison folder (mean ± std over seeds, paired by seed), theirs per dataset (their method's
row minus their "Baseline" row, one run each).

    python -m utils.published runs/compare-AVDigitsImbalanced runs/rerun/compare-AVDigits \\
        --report docs/results/beside-balancebenchmark.md
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from utils.compare import format_mean_std, group_by_method, load_runs, mean_std, method_order

# Their table, test accuracy and macro-F1 in %, copied by hand for the audio-visual sets this
# project also loads (docs/comparison.md shows the same table; a test keeps the two equal).
DATASETS = ("KineticSound", "CREMAD", "VGGSound")
PUBLISHED = {  # method here: {dataset: (acc, f1)}
    "audio_only": {"KineticSound": (55.06, 54.96), "CREMAD": (59.38, 59.23), "VGGSound": (41.27, 40.32)},
    "visual_only": {"KineticSound": (45.31, 43.76), "CREMAD": (58.10, 56.81), "VGGSound": (30.43, 29.61)},
    "joint": {"KineticSound": (65.63, 65.28), "CREMAD": (65.50, 65.07), "VGGSound": (48.08, 46.98)},
    "ogm_ge": {"KineticSound": (67.04, 66.95), "CREMAD": (67.76, 68.02), "VGGSound": (48.25, 47.16)},
    "g_blending": {"KineticSound": (68.82, 66.43), "CREMAD": (71.59, 71.72), "VGGSound": (51.41, 50.39)},
    "pmr": {"KineticSound": (67.11, 66.87), "CREMAD": (67.19, 67.20), "VGGSound": (50.38, 49.01)},
    "agm": {"KineticSound": (66.62, 65.88), "CREMAD": (71.59, 72.11), "VGGSound": (49.06, 47.70)},
    "mmpareto": {"KineticSound": (74.55, 74.21), "CREMAD": (79.97, 80.57), "VGGSound": (49.35, 48.48)},
    "mla": {"KineticSound": (69.05, 68.75), "CREMAD": (72.30, 72.66), "VGGSound": (49.99, 48.62)},
    "mmcosine": {"KineticSound": (67.49, 67.09), "CREMAD": (67.19, 67.34), "VGGSound": (48.73, 47.66)},
    "unimodal_teacher": {"KineticSound": (68.60, 68.43), "CREMAD": (67.47, 67.75), "VGGSound": (51.58, 50.48)},
    "mbsd": {"KineticSound": (68.82, 68.28), "CREMAD": (74.86, 75.48), "VGGSound": (49.48, 47.99)},
    "cml": {"KineticSound": (67.56, 67.22), "CREMAD": (69.18, 69.57), "VGGSound": (50.50, 49.30)},
    "lfm": {"KineticSound": (66.37, 66.02), "CREMAD": (70.02, 69.55), "VGGSound": (47.45, 46.50)},
    "reconboost": {"KineticSound": (68.38, 67.68), "CREMAD": (74.01, 74.52), "VGGSound": (47.27, 46.26)},
    "relearning": {"KineticSound": (65.92, 65.48), "CREMAD": (71.02, 71.46), "VGGSound": (48.12, 47.04)},
    "opm": {"KineticSound": (66.89, 66.44), "CREMAD": (68.75, 69.00), "VGGSound": (49.12, 48.24)},
    "greedy": {"KineticSound": (66.82, 66.53), "CREMAD": (66.48, 66.54), "VGGSound": (48.65, 47.41)},
    "amco": {"KineticSound": (70.54, 69.95), "CREMAD": (73.30, 73.95), "VGGSound": (49.05, 47.18)},
    "modality_valuation": {"KineticSound": (68.01, 68.03), "CREMAD": (75.85, 76.68), "VGGSound": (48.25, 47.22)},
}


def their_gain(method: str, dataset: str) -> float | None:
    """Their method's accuracy minus their Baseline's, in points (None: not in their table)."""
    if method not in PUBLISHED or method in ("joint", "audio_only", "visual_only"):
        return None
    return round(PUBLISHED[method][dataset][0] - PUBLISHED["joint"][dataset][0], 2)


def our_gains(groups: dict, method: str) -> list[float]:
    """Per seed with a joint run of the same seed: fusion test accuracy minus joint's, in points."""
    joint = {r.seed: r.results["test"]["fusion"]["acc"] for r in groups.get("joint", [])
             if "fusion" in r.results.get("test", {})}
    return [100 * (r.results["test"]["fusion"]["acc"] - joint[r.seed]) for r in groups.get(method, [])
            if r.seed in joint and r.selection_head == "fusion" and "fusion" in r.results["test"]]


def format_gain(gains: list[float]) -> str:
    if not gains:
        return "—"
    mean, std = mean_std(gains)
    return f"{mean:+.1f} ± {std:.1f} ({len(gains)})"


def render(folders: list[Path]) -> str:
    summaries = []
    for folder in folders:
        runs, _ = load_runs(folder)
        groups = group_by_method(runs)
        dataset = runs[0].results.get("dataset") or folder.name.removeprefix("compare-")
        summaries.append((dataset, groups))
    # Their methods and every other label of our folders (OLM and its variants), in our order.
    references = ("audio_only", "visual_only", "joint")
    ours_labels = {label for _, groups in summaries for label in groups}
    order = {m: i for i, m in enumerate(method_order())}
    methods = sorted((set(PUBLISHED) | ours_labels) - set(references),
                     key=lambda m: (order.get(m.split("-")[0], len(order)), m))
    ours = [f"ours: {d} fusion acc | ours: {d} − joint" for d, _ in summaries]
    theirs = [f"theirs: {d} − Baseline" for d in DATASETS]
    lines = ["Fusion test accuracy in %; '− joint' is each seed's fusion accuracy minus joint training's of the "
             "same seed, in points, mean ± std over seeds (how many in brackets; ours, runs of this project on the folders named "
             "above each column); '− Baseline' is BalanceBenchmark's published accuracy of the method minus "
             "that of their Baseline (theirs: one number each, their datasets, protocol and splits; not run "
             "here). The two measure different things on different data: read the signs and sizes, not the "
             "values, side by side.", "",
             "| method | " + " | ".join(ours + theirs) + " |",
             "|---|" + "---|" * (2 * len(summaries) + len(DATASETS))]
    for method in ["joint", *methods]:
        cells = []
        for _, groups in summaries:
            accs = [100 * r.results["test"]["fusion"]["acc"] for r in groups.get(method, [])
                    if "fusion" in r.results.get("test", {})]
            gains = our_gains(groups, method) if method != "joint" else []
            cells.append(format_mean_std([a / 100 for a in accs]) if accs else "—")
            cells.append(format_gain(gains))
        for dataset in DATASETS:
            gain = their_gain(method, dataset)
            cells.append("—" if gain is None else f"{gain:+.2f}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m utils.published",
        description="Set each method's gain over joint training in our comparison folders beside the gain "
                    "BalanceBenchmark published on Kinetics-Sounds, CREMA-D and VGGSound (theirs, labelled).")
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR",
                        help="comparison folders (scripts/compare.sh writes runs/compare-<DATASET>)")
    parser.add_argument("--report", help="also write the table here (e.g. docs/results/beside-balancebenchmark.md)")
    args = parser.parse_args(argv)
    body = "# Our comparisons beside BalanceBenchmark's published numbers\n\n" + render([Path(d) for d in args.runs_dirs])
    print(body)
    if args.report:
        from utils.provenance import write_report

        command = " ".join(["python -m utils.published", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
        print(f"wrote {write_report(args.report, body, command=command)}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
