"""Aggregate a comparison folder (one run folder per method and seed) into compare.md/.png.

    python -m utils.compare runs/compare-AVDigits

Reads every ``<run>/results.json`` (the best-on-val epoch and its test numbers) and the
matching row of ``<run>/metrics.jsonl``; groups runs by method, or by the variant label a
folder ``<label>-s<seed>`` gives (scripts/compare.sh names ``olm:--heldout-norm=running``
runs ``olm-running-s<seed>``); reports mean ± sample std over seeds. compare.md is written
with a provenance header (utils/provenance.py); ``--report PATH`` writes a copy for the docs.
See docs/comparison.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.plot import read_rows
from utils.report import regime

# Display order; methods not listed follow alphabetically.
# References first, then OLM, then every other method in the registry's order.
LEADING_METHODS = ("audio_only", "visual_only", "joint", "fusion_only", "ogm_ge", "olm", "olm_loss_ratio", "olm_mean")


def method_order() -> tuple[str, ...]:
    from olmbalance import METHODS

    return LEADING_METHODS + tuple(m for m in METHODS if m not in LEADING_METHODS)
# Config keys that may differ between runs of one fair comparison.
PER_RUN_KEYS = {"method", "seed", "out", "resume", "device", "progress", "plots", "workers", "data_root",
                "imbalance"}
# Options only some methods read (OLM's held-out pass and coefficients, OGM-GE's alpha): they
# must agree among runs of one method, not across methods that ignore them.
METHOD_KEYS = {"heldout_every", "heldout_batch_size", "heldout_norm", "reference_steps", "reference_tail",
               "target_scale", "coef_lr", "coef_weight_decay", "method_settings", "recipe"}
RUN_FOLDER = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")
NORM_SPLITS = ("val", "train")


@dataclass
class Run:
    folder: Path
    method: str
    seed: int
    results: dict
    best_row: dict | None  # the metrics.jsonl row of the best epoch, if it was found
    rows: list[dict] = field(default_factory=list)
    label: str = ""  # the method, or its variant's label (olm-running)

    @property
    def selection_head(self) -> str:
        return self.results.get("selection_head", "fusion")

    def reported_heads(self) -> list[str]:
        """A method selected on a unimodal head trained only that head (audio_only, ...)."""
        heads = list(self.results["test"])
        return heads if self.selection_head == "fusion" else [self.selection_head]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def load_runs(runs_dir: Path) -> tuple[list[Run], list[Path]]:
    """Finished runs (with results.json) directly under ``runs_dir``, and unfinished folders."""
    if not runs_dir.is_dir():
        raise UserError(f"comparison folder {runs_dir} does not exist")
    runs, unfinished = [], []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        results_path = folder / "results.json"
        if not results_path.is_file():
            if (folder / "config.yaml").is_file():
                unfinished.append(folder)
            continue
        results = read_json(results_path)
        if "test" not in results or "method" not in results:
            raise UserError(f"{results_path} lacks 'test' or 'method' (not written by main.py?)")
        rows = read_rows(folder) if (folder / "metrics.jsonl").is_file() else []
        best = next((r for r in rows if r.get("epoch") == results.get("best_epoch")), None)
        runs.append(Run(folder, results["method"], int(results.get("seed", 0)), results, best, rows,
                        variant_label(folder.name, results["method"])))
    if not runs:
        raise UserError(f"no finished run (a folder with results.json) under {runs_dir}")
    return runs, unfinished


def variant_label(folder_name: str, method: str) -> str:
    """``olm-running`` for a folder ``olm-running-s3`` of method olm; the method otherwise."""
    match = RUN_FOLDER.match(folder_name)
    label = match.group("label") if match else method
    return label if label == method or label.startswith(method + "-") else method


def group_by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method or variant label; a variant follows its method."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.label or run.method].append(run)
    order = {m: i for i, m in enumerate(method_order())}

    def key(label):
        method = groups[label][0].method
        return order.get(method, len(order)), method, label != method, label

    return {m: sorted(groups[m], key=lambda r: r.seed) for m in sorted(groups, key=key)}


def head_values(runs: list[Run], head: str, metric: str, split: str = "test") -> list[float]:
    return [r.results[split][head][metric] for r in runs
            if head in r.reported_heads() and head in r.results.get(split, {})]


def modality_heads(runs: list[Run]) -> list[str]:
    heads: list[str] = []
    for run in runs:
        heads += [h for h in run.results["test"] if h != "fusion" and h not in heads]
    return heads


def unimodal_reference(groups: dict[str, list[Run]]) -> tuple[str, float] | None:
    """(method, mean test acc) of the best single-modality model, e.g. audio_only."""
    best = None
    for method, runs in groups.items():
        head = runs[0].selection_head
        if head == "fusion":
            continue
        mean, _ = mean_std(head_values(runs, head, "acc"))
        if best is None or mean > best[1]:
            best = (method, mean)
    return best


def norm_ratios(runs: list[Run], first: str, second: str, split: str) -> list[float]:
    """||z_first|| / ||z_second|| at each run's best epoch (raw logits, as logged)."""
    ratios = []
    for run in runs:
        if run.selection_head != "fusion" or run.best_row is None:
            continue
        norms = run.best_row.get(split, {})
        if first in norms and second in norms and norms[second]["norm"] > 0:
            ratios.append(norms[first]["norm"] / norms[second]["norm"])
    return ratios


def olm_regime(runs: list[Run], heads: list[str]) -> dict | None:
    """OLM's rate-target regime over the epochs after the reference epoch (utils.report.regime),
    as per-seed values: saturated share, target mass (ratio share) and saturated share per head,
    mean G and C per head, final coefficients. ``None`` when no run logged saturation."""
    per_seed = {"saturated": [], "mass": defaultdict(list), "saturated_head": defaultdict(list),
                "G": defaultdict(list), "C": defaultdict(list), "coefficients": defaultdict(list)}
    for run in runs:
        stats = regime(run.rows, heads)
        if stats is None or math.isnan(stats["saturated"]):
            continue
        per_seed["saturated"].append(stats["saturated"])
        total = sum(v for v in stats["ratio"].values() if not math.isnan(v))
        for head in heads:
            if total > 0 and not math.isnan(stats["ratio"][head]):
                per_seed["mass"][head].append(stats["ratio"][head] / total)
            if not math.isnan(stats["saturated_head"][head]):
                per_seed["saturated_head"][head].append(stats["saturated_head"][head])
            for key in ("G", "C"):
                values = [r["olm"][key][head] for r in run.rows
                          if r.get("epoch") in stats["epochs"] and head in ((r.get("olm") or {}).get(key) or {})]
                if values:
                    per_seed[key][head].append(statistics.fmean(values))
            final = run.results.get("coefficients") or (run.rows[-1].get("coefficients", {}) if run.rows else {})
            if head in final:
                per_seed["coefficients"][head].append(float(final[head]))
    if not per_seed["saturated"]:
        return None
    result = {"saturated": statistics.fmean(per_seed["saturated"]), "saturated_values": per_seed["saturated"]}
    for key in ("mass", "saturated_head", "G", "C", "coefficients"):
        result[key] = {h: statistics.fmean(v) for h, v in per_seed[key].items() if v}
        result[f"{key}_values"] = {h: v for h, v in per_seed[key].items() if v}
    return result


def own_gaps(runs: list[Run]) -> list[float]:
    """Per run: fusion test accuracy minus the best unimodal head of the same model."""
    gaps = []
    for run in runs:
        test = run.results["test"]
        unimodal = [test[h]["acc"] for h in run.reported_heads() if h != "fusion" and h in test]
        if "fusion" in run.reported_heads() and unimodal:
            gaps.append(test["fusion"]["acc"] - max(unimodal))
    return gaps


def protocol_differences(runs: list[Run]) -> dict[str, list]:
    """Config keys (besides method, seed, paths, device) whose values differ between runs."""
    import yaml

    import olmbalance

    values: dict[str, set] = defaultdict(set)
    for run in runs:
        path = run.folder / "config.yaml"
        try:
            config = yaml.safe_load(path.read_text()) if path.is_file() else {}
        except yaml.YAMLError:
            raise UserError(f"{path} is not valid YAML") from None
        config = config or {k: run.results.get(k) for k in ("dataset", "fusion", "epochs")}
        # A method that brings its own recipe (olmbalance: OGM-GE's optimizer, --recipe authors)
        # is compared on its own terms for those keys.
        entry = olmbalance.METHODS.get(run.method)
        recipe = {k for by_dataset in (entry.recipes.values() if entry else ()) for options in by_dataset.values()
                  for k in options}
        for key, value in config.items():
            if key in METHOD_KEYS or key in recipe:
                values[f"{key} ({run.label or run.method})"].add(json.dumps(value, sort_keys=True))
            elif key not in PER_RUN_KEYS:
                values[key].add(json.dumps(value, sort_keys=True))
    return {k: sorted(v) for k, v in values.items() if len(v) > 1}


def unimodal_ensemble(runs: list[Run]) -> dict | None:
    """Per seed, the unimodal ensemble: the single-modality runs of that seed (audio_only,
    visual_only; variants left out) fused by the mean of their softmax test probabilities at
    their best-on-val checkpoints (each run's predictions.npz, engines/imbalance.py). Seeds
    that lack a modality's run or its predictions are listed in ``skipped``. ``None`` when no
    seed has two single-modality runs."""
    import numpy as np

    from utils.predictions import read_predictions
    from utils.scores import f1_scores

    by_seed: dict[int, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        if run.selection_head != "fusion" and run.label == run.method:
            by_seed[run.seed][run.selection_head] = run
    modalities = sorted({m for members in by_seed.values() for m in members})
    if len(modalities) < 2:
        return None
    result = {"methods": sorted({r.method for members in by_seed.values() for r in members.values()}),
              "seeds": [], "acc_values": [], "f1_values": [], "skipped": {}}
    for seed, members in sorted(by_seed.items()):
        saved = {m: read_predictions(members[m].folder) if m in members else None for m in modalities}
        missing = [m for m, p in saved.items() if p is None]
        if missing:
            result["skipped"][seed] = f"no predictions of {', '.join(missing)}"
            continue
        labels = [p["test_labels"] for p in saved.values()]
        if any(not np.array_equal(labels[0], other) for other in labels[1:]):
            result["skipped"][seed] = "the runs' test samples differ"
            continue
        predicted = np.mean([p["test_probs"] for p in saved.values()], axis=0).argmax(axis=1)
        result["seeds"].append(seed)
        result["acc_values"].append(float((predicted == labels[0]).mean()))
        result["f1_values"].append(f1_scores(labels[0], predicted)[0])
    return result if result["seeds"] or result["skipped"] else None


def ensemble_gaps(runs: list[Run], ensemble: dict | None) -> list[float]:
    """Per run with a fusion head: its fusion test accuracy minus the same seed's ensemble's."""
    by_seed = dict(zip(ensemble["seeds"], ensemble["acc_values"])) if ensemble else {}
    return [r.results["test"]["fusion"]["acc"] - by_seed[r.seed] for r in runs
            if r.seed in by_seed and "fusion" in r.reported_heads() and "fusion" in r.results["test"]]


def imbalance_values(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    """Per seed, from results.json's "imbalance" (test split): each modality's linear-probe
    accuracy, the fusion head's accuracy drop when its features are shuffled, its Shapley value.
    A single-modality run reports the probe of its trained encoder only."""
    values = {"probe": defaultdict(list), "reliance": defaultdict(list), "shapley": defaultdict(list)}
    for run in runs:
        imbalance = run.results.get("imbalance") or {}
        for m, probe in (imbalance.get("probe") or {}).items():
            if m in run.reported_heads():
                values["probe"][m].append(probe["test"]["acc"])
        for m, entry in ((imbalance.get("reliance") or {}).get("test") or {}).items():
            if m != "intact":
                values["reliance"][m].append(entry["drop"])
        for m, value in (((imbalance.get("shapley") or {}).get("test") or {}).get("values") or {}).items():
            values["shapley"][m].append(value)
    return {key: dict(per_modality) for key, per_modality in values.items()}


def run_recipe(run: Run) -> str:
    """How a run was optimized, from its config.yaml: --recipe, optimizer, lr, schedule, batch."""
    import yaml

    path = run.folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        config = None
    if not config:
        return "?"
    text = f"{config.get('recipe', 'default')}: {config.get('optimizer', '?')} {config.get('lr', '?'):g}"
    if config.get("optimizer") == "sgd" and config.get("momentum"):
        text += f" m{config['momentum']:g}"
    if config.get("lr_step"):
        text += f", step {config['lr_step']}"
    return text + f", batch {config.get('batch_size', '?')}"


def summarize(runs_dir: Path, norm_split: str = "val") -> dict:
    """Everything compare.md and compare.png show, as plain data (tests read this)."""
    runs, unfinished = load_runs(runs_dir)
    groups = group_by_method(runs)
    heads = list(dict.fromkeys(h for r in runs for h in r.results["test"]))
    modalities = modality_heads(runs)
    reference = unimodal_reference(groups)
    ensemble = unimodal_ensemble(runs)
    methods = {}
    for method, method_runs in groups.items():
        entry = {"seeds": [r.seed for r in method_runs], "heads": {},
                 "recipe": "; ".join(sorted({run_recipe(r) for r in method_runs}))}
        for head in heads:
            acc, f1 = head_values(method_runs, head, "acc"), head_values(method_runs, head, "f1")
            if acc:
                entry["heads"][head] = {"acc": mean_std(acc), "f1": mean_std(f1), "acc_values": acc,
                                        "f1_values": f1}
        fusion = entry["heads"].get("fusion")
        entry["gap"] = (fusion["acc"][0] - reference[1]) if fusion and reference else None
        # Per seed: against the best unimodal model when one was trained, else against the
        # best unimodal head of the same model (the compare.md caption says which).
        entry["gap_values"] = ([a - reference[1] for a in fusion["acc_values"]] if fusion and reference
                               else own_gaps(method_runs))
        ratios = norm_ratios(method_runs, *modalities[:2], norm_split) if len(modalities) >= 2 else []
        entry["norm_ratio"] = mean_std(ratios) if ratios else None
        entry["norm_ratio_values"] = ratios
        entry["regime"] = olm_regime(method_runs, heads)
        entry["imbalance"] = imbalance_values(method_runs)
        entry["ensemble_gap_values"] = ensemble_gaps(method_runs, ensemble)
        methods[method] = entry
    return {"runs_dir": str(runs_dir), "heads": heads, "modalities": modalities, "reference": reference,
            "norm_split": norm_split, "methods": methods, "ensemble": ensemble,
            "unfinished": [str(p) for p in unfinished],
            "protocol_differences": protocol_differences(runs),
            "dataset": sorted({r.results.get("dataset", "?") for r in runs}),
            "epochs": sorted({r.results.get("epochs", 0) for r in runs})}


def format_gap(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def format_heads(values: dict[str, list[float]], heads: list[str], scale: float = 1.0, digits: int = 2,
                 unit: str = "") -> str:
    """'audio 0.45 ± 0.03, visual ...' over the heads that have values."""
    parts = []
    for head in heads:
        if values.get(head):
            mean, std = mean_std(values[head])
            parts.append(f"{head} {scale * mean:.{digits}f}{unit} ± {scale * std:.{digits}f}")
    return ", ".join(parts) or "—"


def render_regime(summary: dict) -> list[str]:
    """The OLM regime table: how often the rate target saturated and where its mass went."""
    regimes = {m: e["regime"] for m, e in summary["methods"].items() if e["regime"]}
    if not regimes:
        return []
    heads = summary["heads"]
    lines = ["", "## OLM's regime (epochs after the reference epoch, mean ± std over seeds)", "",
             "Saturated: share of steps whose rate target was one-hot (G/C huge after clamping C <= 0); "
             "target mass: each head's share of the mean target ratios; saturated on: share of steps "
             "whose whole mass went to that head; coefficients: final w per head.", "",
             "| method | seeds | saturated steps | target mass | saturated on | final coefficients | mean G | mean C |",
             "|---|---|---|---|---|---|---|---|"]
    for method, entry in regimes.items():
        saturated = mean_std(entry["saturated_values"])
        lines.append("| " + " | ".join([
            method, str(len(entry["saturated_values"])),
            f"{100 * saturated[0]:.0f}% ± {100 * saturated[1]:.0f}",
            format_heads(entry["mass_values"], heads),
            format_heads(entry["saturated_head_values"], heads, scale=100, digits=0, unit="%"),
            format_heads(entry["coefficients_values"], heads, digits=3),
            ", ".join(f"{h} {v:.3g}" for h, v in entry["G"].items()),
            ", ".join(f"{h} {v:.3g}" for h, v in entry["C"].items())]) + " |")
    return lines


def ensemble_label(ensemble: dict) -> str:
    return "ensemble (" + " + ".join(ensemble["methods"]) + ")"


def render_imbalance(summary: dict) -> list[str]:
    """Per method: linear-probe test accuracy, reliance drop and Shapley value per modality
    (results.json "imbalance"), and its fusion accuracy against the unimodal ensemble."""
    ensemble = summary.get("ensemble")
    modalities = summary["modalities"]
    shown = {m: e for m, e in summary["methods"].items() if any(e["imbalance"].values()) or e["ensemble_gap_values"]}
    if not shown:
        return []
    lines = ["", "## Imbalance diagnostics (test split, best-on-validation checkpoint, mean ± std over seeds)", "",
             "Probe: test accuracy of a linear probe of each modality's frozen encoder (fitted on train, its L2 "
             "picked on validation; engines/imbalance.py); reliance: drop of the fusion test accuracy when that "
             "modality's features are taken from other samples; Shapley: the modality's Shapley value of fusion "
             "test accuracy over modality subsets, absent inputs zeroed (BalanceBenchmark's measure); all in points. "
             "Fusion − ensemble: fusion test accuracy minus that of the same seed's unimodal ensemble (mean of the "
             "single-modality runs' softmax probabilities), in points.", ""]
    header = (["method", "seeds"] + [f"probe {m}" for m in modalities] + [f"reliance {m}" for m in modalities]
              + [f"Shapley {m}" for m in modalities] + ["fusion − ensemble"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in shown.items():
        values = entry["imbalance"]
        cells = [method, str(len(entry["seeds"]))]
        for key in ("probe", "reliance", "shapley"):
            cells += [format_mean_std(values[key][m]) if values[key].get(m) else "—" for m in modalities]
        cells.append(format_gap(entry["ensemble_gap_values"]))
        lines.append("| " + " | ".join(cells) + " |")
    if ensemble:
        if ensemble["seeds"]:
            lines += ["", f"{ensemble_label(ensemble)}: {format_mean_std(ensemble['acc_values'])}% test accuracy "
                          f"over seeds {', '.join(map(str, ensemble['seeds']))}."]
        if ensemble["skipped"]:
            lines += ["", "No ensemble for seed(s) " + "; ".join(f"{seed} ({why})" for seed, why in
                                                               ensemble["skipped"].items()) + "."]
    return lines


def render_markdown(summary: dict) -> str:
    heads, modalities = summary["heads"], summary["modalities"]
    reference = summary["reference"]
    lines = [f"# Comparison on {', '.join(summary['dataset'])} (epochs: {', '.join(map(str, summary['epochs']))})",
             "",
             "Test metrics at each run's best-on-validation epoch, in %, mean ± sample std over seeds. "
             "Methods trained on one modality report only that head.", ""]
    header = ["method", "seeds", "recipe"] + [f"{h} acc" for h in heads] + [f"{h} F1" for h in heads]
    header += ["fusion − best unimodal"]
    if len(modalities) >= 2:
        header += [f"‖z_{modalities[0]}‖/‖z_{modalities[1]}‖ ({summary['norm_split']}, best epoch)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in summary["methods"].items():
        cells = [method, str(len(entry["seeds"])), entry.get("recipe", "?")]
        cells += [format_mean_std(entry["heads"][h]["acc_values"]) if h in entry["heads"] else "—" for h in heads]
        cells += [format_mean_std(entry["heads"][h]["f1_values"]) if h in entry["heads"] else "—" for h in heads]
        cells.append(format_gap(entry["gap_values"]))
        if len(modalities) >= 2:
            cells.append(format_mean_std(entry["norm_ratio_values"], scale=1.0, digits=2)
                         if entry["norm_ratio_values"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    ensemble = summary.get("ensemble")
    if ensemble and ensemble["seeds"]:
        cells = [ensemble_label(ensemble), str(len(ensemble["seeds"])), "—"]
        for metric in ("acc", "f1"):
            cells += [format_mean_std(ensemble[f"{metric}_values"]) if h == "fusion" else "—" for h in heads]
        cells.append(format_gap([a - reference[1] for a in ensemble["acc_values"]]) if reference else "—")
        if len(modalities) >= 2:
            cells.append("—")  # no norm ratio: two separate models
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if reference:
        lines.append(f"Best unimodal model: {reference[0]} ({100 * reference[1]:.1f}% test accuracy); "
                     "the gap column is each seed's fusion accuracy minus it, in points.")
    else:
        lines.append("No unimodal model (audio_only / visual_only) was trained: the gap column is each "
                     "run's fusion accuracy minus the best unimodal head of the same model, in points.")
    lines += render_imbalance(summary)
    lines += render_regime(summary)
    notes = []
    if summary["protocol_differences"]:
        differing = "; ".join(f"{k}: {', '.join(v)}" for k, v in summary["protocol_differences"].items())
        notes.append(f"Warning: the runs do not share one protocol ({differing}).")
    if summary["unfinished"]:
        notes.append(f"Skipped {len(summary['unfinished'])} unfinished run folder(s) without results.json: "
                     + ", ".join(Path(p).name for p in summary["unfinished"]) + ".")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def draw_imbalance(probe_axis, reliance_axis, summary: dict) -> None:
    """Linear-probe test accuracy per modality and method; the fusion head's reliance (accuracy
    drop, points) on each modality per method; mean ± std over seeds."""
    from utils.plot import grouped_bars, head_colours

    modalities = summary["modalities"]
    colours = head_colours(modalities)
    for axis, key, title in ((probe_axis, "probe", "linear probe of each frozen encoder: test accuracy (%)"),
                             (reliance_axis, "reliance", "fusion test acc drop, modality shuffled (points)")):
        groups = {m: {method: tuple(100 * v for v in mean_std(e["imbalance"][key][m]))
                      for method, e in summary["methods"].items() if e["imbalance"].get(key, {}).get(m)}
                  for m in modalities}
        labels = [method for method in summary["methods"] if any(method in g for g in groups.values())]
        grouped_bars(axis, labels, groups, colours)
        axis.set_title(title, fontsize=9)
        axis.axhline(0, color="black", lw=0.5)
        axis.legend(fontsize=7, loc="best")


def render_figure(summary: dict, out: Path) -> Path:
    """Grouped bars of per-head test accuracy (± std) per method with the best unimodal model and
    the unimodal ensemble, and the norm ratio; below them, when the runs hold imbalance
    diagnostics, each modality's linear-probe accuracy and the fusion head's reliance on it."""
    from utils.plot import grouped_bars, head_colours, pyplot

    plt = pyplot()
    methods = list(summary["methods"])
    heads = summary["heads"]
    colours = head_colours(heads)
    diagnosed = any(any(e["imbalance"].values()) for e in summary["methods"].values())
    figure = plt.figure(figsize=(max(8, 1.3 * len(methods) + 4), 4.2 * (2 if diagnosed else 1)))
    grid = figure.add_gridspec(2 if diagnosed else 1, 1)
    bars, ratio = grid[0].subgridspec(1, 2, width_ratios=[3, 1.4]).subplots()
    accuracy = {h: {m: tuple(100 * v for v in e["heads"][h]["acc"]) for m, e in summary["methods"].items()
                    if h in e["heads"]} for h in heads}
    tops = grouped_bars(bars, methods, accuracy, colours)
    if summary["reference"]:
        tops.append(100 * summary["reference"][1])
        bars.axhline(100 * summary["reference"][1], color="black", ls=":", lw=1,
                     label=f"best unimodal ({summary['reference'][0]})")
    ensemble = summary.get("ensemble")
    if ensemble and ensemble["seeds"]:
        bars.axhline(100 * mean_std(ensemble["acc_values"])[0], color="tab:purple", ls="--", lw=1,
                     label=ensemble_label(ensemble))
    bars.set_ylabel("test accuracy (%)")
    bars.set_title("per-head test accuracy at the best-on-val epoch", fontsize=9)
    bars.set_ylim(0, 1.3 * max(tops + [1.0]))  # headroom so the legend covers no bar
    bars.legend(fontsize=7, loc="upper left", ncol=2)
    if diagnosed:
        draw_imbalance(*grid[1].subgridspec(1, 2, width_ratios=[1.6, 1]).subplots(), summary)
    shown = [m for m in methods if summary["methods"][m]["norm_ratio"]]
    ratio.bar(range(len(shown)), [summary["methods"][m]["norm_ratio"][0] for m in shown],
              yerr=[summary["methods"][m]["norm_ratio"][1] for m in shown], capsize=2, color="gray")
    ratio.axhline(1.0, color="black", ls=":", lw=1)
    ratio.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    pair = "/".join(f"‖z_{m}‖" for m in summary["modalities"][:2]) or "norm ratio"
    ratio.set_title(f"{pair} ({summary['norm_split']}, best epoch)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Aggregate the runs of a comparison folder (one sub-folder per method and seed, "
                    "as scripts/compare.sh writes) into compare.md and compare.png.")
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="folder holding <method>-s<seed>/ run folders")
    parser.add_argument("--norm-split", choices=NORM_SPLITS, default="val",
                        help="split whose mean logit norms (at the best epoch) give the norm ratio")
    parser.add_argument("--no-figure", action="store_true", help="write compare.md only")
    parser.add_argument("--note", help="a paragraph placed under the title (what the runs are, e.g. "
                                       "which flags each variant label stands for)")
    parser.add_argument("--report", help="also write the markdown here (e.g. docs/results/compare-avdigits.md), "
                                         "for the README's generated blocks")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    summary = summarize(runs_dir, args.norm_split)
    from utils.provenance import write_report

    body = render_markdown(summary)
    if args.note:
        title, rest = body.split("\n", 1)
        body = f"{title}\n\n{args.note.strip()}\n{rest}"
    # Name the module, not the file path that ``python -m`` leaves in sys.argv[0].
    command = " ".join(["python -m utils.compare", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    for path in [runs_dir / "compare.md"] + ([Path(args.report)] if args.report else []):
        print(f"wrote {write_report(path, body, command=command)}")
    if not args.no_figure:
        # The report's figure sits beside it (compare-avdigits.md -> compare-avdigits.png), so
        # the command that regenerates the docs' table also regenerates their image.
        figures = [runs_dir / "compare.png"] + ([Path(args.report).with_suffix(".png")] if args.report else [])
        for figure in figures:
            render_figure(summary, figure)
            print(f"wrote {figure}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
