"""Choose the embedded imbalanced setting (AVDigitsImbalanced) by measuring imbalance.

Each candidate is a set of AV-Digits materialization knobs (how the digit is drawn) plus
training flags. For each candidate and seed, four runs of main.py: ``visual_only``,
``audio_only``, ``fusion_only`` and ``joint`` (no balancing method is run here). From their
``results.json`` (test at the best-on-validation epoch; ``imbalance``: linear probes of the
frozen encoders, reliance, Shapley shares) the report gives, per candidate:

- required: under ``fusion_only`` the weak modality's linear-probe test accuracy at least 8
  points below its ``*_only`` run's probe;
- beside it: the ``joint`` weak head against its ``*_only`` run, reliance and Shapley share
  of the fusion head per modality (``joint`` and ``fusion_only``), the logit-norm ratio and
  whether ``joint``'s fusion beats the unimodal ensemble.

Runs are kept under --runs (a finished run is not redone), so the search resumes.

    python benchmarks/imbalance_search.py --candidates c16-clutter4 c12-clutter2 --seeds 0
    python benchmarks/imbalance_search.py --report docs/results/imbalance-selection.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("visual_only", "audio_only", "fusion_only", "joint")
WEAK, STRONG = "visual", "audio"
GAP_REQUIRED = 8.0  # points of linear-probe test accuracy
CHOSEN = "c12-clutter0-noise0.3"  # datasets/avdigits.py IMBALANCED (tests/test_avdigits.py checks they agree)
# name -> (materialization knobs, extra main.py flags)
CANDIDATES: dict[str, tuple[dict, list[str]]] = {
    "c16-clutter4-noise0.3": (dict(audio_snr_db=None, visual_noise_std=0.3, canvas=16, clutter=4, image_size=32),
                              ["--image-size", "32"]),
    "c12-clutter2-noise0.3": (dict(audio_snr_db=None, visual_noise_std=0.3, canvas=12, clutter=2, image_size=24),
                              ["--image-size", "24"]),
    "c16-clutter0-noise0.3": (dict(audio_snr_db=None, visual_noise_std=0.3, canvas=16, clutter=0, image_size=32), []),
    "c12-clutter0-noise0.3": (dict(audio_snr_db=None, visual_noise_std=0.3, canvas=12, clutter=0, image_size=24),
                              ["--image-size", "24"]),
    "c12-clutter0-noise0.3-sgd": (dict(audio_snr_db=None, visual_noise_std=0.3, canvas=12, clutter=0, image_size=24),
                                  ["--image-size", "24", "--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.9"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="*", default=[], help=f"candidates to run: {', '.join(CANDIDATES)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds to run")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="methods to run")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "imbalance-search", help="run folders")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--report", type=Path, help="write the selection log (markdown) here")
    args = parser.parse_args(argv)
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    return args


def materialized_root(knobs: dict) -> Path:
    from datasets import avdigits
    from datasets.registry import cache_home

    root = cache_home() / f"AVDigitsImbalanced-{avdigits.params_key(**knobs)}"
    return avdigits.materialize(root, **knobs)


def run_one(root: Path, flags: list[str], method: str, seed: int, out: Path) -> float:
    if (out / "results.json").is_file():
        return 0.0
    began = time.time()
    command = [sys.executable, str(REPO / "main.py"), "--dataset", "AVDigitsImbalanced", "--data-root", str(root),
               "--method", method, "--seed", str(seed), "--out", str(out), "--no-progress", "--no-plots",
               "--keep-checkpoints", "none", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{out.name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return time.time() - began


def load(path: Path) -> dict | None:
    try:
        return json.loads((path / "results.json").read_text())
    except (OSError, ValueError):
        return None


def ensemble_accuracy(candidate_runs: Path, seed: int) -> float | None:
    """The comparison report's unimodal-ensemble accuracy of ``seed`` (utils.compare), from the
    candidate's audio_only and visual_only runs (a candidate folder is a comparison folder)."""
    from utils.compare import load_runs, unimodal_ensemble

    ensemble = unimodal_ensemble(load_runs(candidate_runs)[0])
    if not ensemble or seed not in ensemble["seeds"]:
        return None
    return ensemble["acc_values"][ensemble["seeds"].index(seed)]


def measures(runs: Path, name: str, seed: int) -> dict | None:
    folders = {m: runs / name / f"{m}-s{seed}" for m in METHODS}
    results = {m: load(f) for m, f in folders.items()}
    if results["visual_only"] is None or results["fusion_only"] is None:
        return None  # the required criterion needs these two; the rest is shown when present

    def probe(method, modality):
        found = results[method]
        return None if found is None else 100 * found["imbalance"]["probe"][modality]["test"]["acc"]

    def head(method, h):
        return None if results[method] is None else 100 * results[method]["test"][h]["acc"]

    row = {"seed": seed,
           "weak_only_probe": probe("visual_only", WEAK), "weak_fusion_only_probe": probe("fusion_only", WEAK),
           "strong_only_probe": probe("audio_only", STRONG), "strong_fusion_only_probe": probe("fusion_only", STRONG),
           "weak_only_head": head("visual_only", WEAK), "weak_joint_head": head("joint", WEAK),
           "fusion_joint": head("joint", "fusion"), "fusion_fusion_only": head("fusion_only", "fusion")}
    row["probe_gap"] = row["weak_only_probe"] - row["weak_fusion_only_probe"]
    for method in ("joint", "fusion_only"):
        if results[method] is None:
            for modality in (STRONG, WEAK):
                row[f"reliance_{method}_{modality}"] = row[f"shapley_{method}_{modality}"] = None
            continue
        imbalance = results[method]["imbalance"]
        for modality in (STRONG, WEAK):
            row[f"reliance_{method}_{modality}"] = 100 * imbalance["reliance"]["test"][modality]["drop"]
            values = imbalance["shapley"]["test"]["values"]
            row[f"shapley_{method}_{modality}"] = values[modality] / max(sum(values.values()), 1e-12)
    norms = results["joint"]["test"] if results["joint"] else None
    row["norm_ratio_joint"] = norms[STRONG]["norm"] / max(norms[WEAK]["norm"], 1e-12) if norms else None
    ensemble = ensemble_accuracy(runs / name, seed) if results["audio_only"] else None
    row["ensemble"] = None if ensemble is None else 100 * ensemble
    return row


def pct(value):
    return None if value is None else 100 * value


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(runs: Path) -> str:
    lines = ["Selection of the embedded imbalanced setting (issue 18), measured only on `visual_only`, "
             "`audio_only`, `fusion_only` and `joint`, before any balancing method ran on it. Test accuracy "
             "in %, at each run's best-on-validation epoch; probes are linear probes of the frozen encoders "
             "(engines/imbalance.py). Required: the visual probe under `fusion_only` at least "
             f"{GAP_REQUIRED:.0f} points below `visual_only`'s.", ""]
    header = ("| candidate | knobs, flags | seeds | visual probe: visual_only / fusion_only (gap) | meets | "
              "audio probe: audio_only / fusion_only | visual head: visual_only / joint | fusion: joint / "
              "fusion_only / unimodal ensemble | reliance drop joint a/v | Shapley share joint a/v (%) | "
              "logit-norm ratio a/v (joint) |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, (knobs, flags) in CANDIDATES.items():
        rows = [r for seed in range(10) if (r := measures(runs, name, seed)) is not None]
        if not rows:
            continue
        gaps = [r["probe_gap"] for r in rows]
        meets = "yes" if statistics.mean(gaps) >= GAP_REQUIRED else "no"
        knob_text = ", ".join(f"{k}={v}" for k, v in knobs.items()) + (f"; {' '.join(flags)}" if flags else "")
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(
            f"| {name} | {knob_text} | {seeds} | {mean_std([r['weak_only_probe'] for r in rows])} / "
            f"{mean_std([r['weak_fusion_only_probe'] for r in rows])} ({mean_std(gaps)}) | {meets} | "
            f"{mean_std([r['strong_only_probe'] for r in rows])} / {mean_std([r['strong_fusion_only_probe'] for r in rows])} | "
            f"{mean_std([r['weak_only_head'] for r in rows])} / {mean_std([r['weak_joint_head'] for r in rows])} | "
            f"{mean_std([r['fusion_joint'] for r in rows])} / {mean_std([r['fusion_fusion_only'] for r in rows])} / "
            f"{mean_std([r['ensemble'] for r in rows])} | "
            f"{mean_std([r['reliance_joint_audio'] for r in rows])} / {mean_std([r['reliance_joint_visual'] for r in rows])} | "
            f"{mean_std([pct(r['shapley_joint_audio']) for r in rows])} / {mean_std([pct(r['shapley_joint_visual']) for r in rows])} | "
            f"{mean_std([r['norm_ratio_joint'] for r in rows])} |")
    lines += ["", f"Chosen: `{CHOSEN}`, the candidate that meets the requirement over 5 seeds with the most "
              "learnable weak modality (`datasets/avdigits.py` IMBALANCED, `--dataset AVDigitsImbalanced`).",
              "", "Per seed (visual probe gap, points): " + "; ".join(
        f"{name}: " + ", ".join(f"s{r['seed']} {r['probe_gap']:.1f}" for seed in range(10)
                                if (r := measures(runs, name, seed)) is not None)
        for name in CANDIDATES if any(measures(runs, name, s) for s in range(10)))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = []
    for name in args.candidates:
        knobs, flags = CANDIDATES[name]
        root = materialized_root(knobs)
        for seed in args.seeds:
            for method in args.methods:
                jobs.append((root, flags, method, seed, args.runs / name / f"{method}-s{seed}"))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (_, _, method, seed, out), seconds in zip(jobs, pool.map(lambda job: run_one(*job), jobs)):
            print(f"{out.parent.name} {method} s{seed}: {seconds:.0f} s", flush=True)
    text = report(args.runs)
    print(text)
    if args.report:
        from utils.provenance import write_report

        write_report(args.report, "# Imbalanced setting: selection log\n\n" + text)


if __name__ == "__main__":
    main()
