"""K-fold cross-validation for the mid-fusion runs (main_trans.py).

The train pool is cut into seeded, stratified folds (the assignment is written to
``<out>/folds.json``, the resolved options to ``<out>/config.yaml``). Each fold trains with
``engines.trainer.fit`` in ``<out>/fold<k>/`` and picks its best epoch on its own validation
fold; that fold's ``best.pt`` then predicts the validation fold and every labelled test set
(``fold<k>/predictions-<split>.npz``). ``<out>/cv_results.json`` holds MER2023's metrics per
fold, their mean and standard deviation over folds, and those of the fold ensemble (the
folds' predictions averaged per test sample).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from sklearn.model_selection import StratifiedKFold

from engines.mer_scoring import Predictions, ensemble, mer2023_scores, predict
from engines.methods import method_from_config
from engines.trainer import fit, make_loaders
from utils import distributed
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.run_logging import write_json

OPTIONS_FILE = "config.yaml"
# Options a resumed run may change: where and how it runs, and how many of the folds it trains
# (--max-folds), never what a fold trains.
RESUME_FREE_OPTIONS = frozenset({"resume", "out", "device", "workers", "progress", "plots", "cpu_threads",
                                  "eval_batch_size", "keep_checkpoints", "data_root", "label_file", "amp",
                                  "max_folds"})


def stratified_folds(labels, folds: int, seed: int) -> list[np.ndarray]:
    """Validation indices of each fold: disjoint, covering every sample, class shares kept."""
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    label, smallest = min(Counter(labels).items(), key=lambda item: item[1])
    if smallest < folds:
        raise UserError(f"--folds {folds}: class {label} has only {smallest} samples in the train pool")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(val) for _, val in splitter.split(np.zeros(len(labels)), labels)]


def output_dir(cfg, default_name: str) -> Path:
    """--resume <cv folder>, else --out, else runs/<name>-<time>; never reuse a finished one."""
    if cfg.resume:
        path = Path(cfg.resume).expanduser()
        if not (path / "folds.json").is_file():
            raise UserError(f"--resume {cfg.resume}: not a cross-validation folder (no folds.json)")
        return path
    path = Path(cfg.out).expanduser() if cfg.out else Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "folds.json").exists():
        raise UserError(f"--out {path} already holds a cross-validation run; pass --resume {path} or choose another --out")
    return path


def is_cv_folder(path) -> bool:
    return path is not None and (Path(path).expanduser() / "folds.json").is_file()


def saved_options(cv_dir: Path) -> dict:
    """The options a cross-validation folder was started with: its config.yaml, or for a folder
    written before those were saved, the first fold's (every fold runs the same options)."""
    cv_dir = Path(cv_dir).expanduser()
    for path in (cv_dir / OPTIONS_FILE, cv_dir / "fold1" / "config.yaml"):
        if path.is_file():
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                raise UserError(f"--resume {cv_dir}: cannot read {path} ({error})") from None
            return {k: v for k, v in values.items() if k not in ("resume", "out")}
    raise UserError(f"--resume {cv_dir}: no saved options ({cv_dir / OPTIONS_FILE}); start it again with --out")


def conflicting_options(saved: dict, given: dict) -> dict:
    """Options given now that differ from the saved ones (other than RESUME_FREE_OPTIONS)."""
    return {k: (v, saved[k]) for k, v in given.items()
            if k not in RESUME_FREE_OPTIONS and k in saved and v != saved[k]}


def refuse_conflicts(source, saved: dict, given: dict, what: str) -> None:
    conflicts = conflicting_options(saved, given)
    if conflicts:
        listed = ", ".join(f"--{k.replace('_', '-')} {v!r} (saved: {old!r})" for k, (v, old) in sorted(conflicts.items()))
        raise UserError(f"--resume {source}: {listed} differ from the options {what} was trained with; "
                        "drop them to continue that run, or start a new one with --out")


def record_assignment(out_dir: Path, names: list[str], folds: list[np.ndarray], cfg) -> None:
    """Write folds.json and config.yaml; when resuming, insist the folds are the ones trained before."""
    fold_of = {names[i]: k + 1 for k, indices in enumerate(folds) for i in indices}
    assignment = {"fold_seed": cfg.fold_seed, "folds": len(folds), "fold_of": dict(sorted(fold_of.items()))}
    path = out_dir / "folds.json"
    if cfg.resume:
        if json.loads(path.read_text()) != assignment:
            raise UserError(f"--resume {out_dir}: the fold assignment differs from {path} (changed data, --folds or --fold-seed)")
        return
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        options = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "out")}
        (out_dir / OPTIONS_FILE).write_text(yaml.safe_dump(options, sort_keys=False))
        write_json(path, assignment)


def score_checkpoint(model, checkpoint: Path, datasets: dict, cfg, collate_fn, device, fold_dir: Path) -> dict:
    """MER2023's metrics of ``checkpoint`` per split; each split's predictions are saved in
    ``fold_dir`` for the fold ensemble."""
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
    scores = {}
    for split, dataset in datasets.items():
        predictions = predict(model, dataset, batch_size, device, collate_fn)
        scores[split] = mer2023_scores(predictions, split)
        if distributed.is_main():
            predictions.save(fold_dir / f"predictions-{split}.npz")
    return scores


def summarize(fold_scores: list[dict]) -> dict:
    """split -> head -> metric -> {mean, std (over folds, ddof 0), per_fold}."""
    summary = {}
    for split, heads in fold_scores[0].items():
        summary[split] = {}
        for head, metrics in heads.items():
            summary[split][head] = {}
            for metric in metrics:
                values = [s[split][head][metric] for s in fold_scores if metric in s[split].get(head, {})]
                summary[split][head][metric] = {"per_fold": values, "mean": float(np.mean(values)),
                                                "std": float(np.std(values))}
    return summary


def ensemble_scores(out_dir: Path, count: int, splits) -> dict:
    """MER2023's metrics of the folds' averaged predictions, per test split."""
    scores = {}
    for split in splits:
        paths = [out_dir / f"fold{k}" / f"predictions-{split}.npz" for k in range(1, count + 1)]
        if all(p.is_file() for p in paths):
            scores[split] = mer2023_scores(ensemble([Predictions.load(p) for p in paths]), split)
    return scores


def cv_table(results: dict) -> str:
    splits = list(results["summary"])
    lines = [f"{results['dataset']} / {results['method']} / {results['model_type']} "
             f"({results['modalities']}): {results['folds_run']} of {results['folds']} folds, best epoch "
             f"on each fold's val {results['selection_head']} {results.get('selection_metric', 'acc')}, "
             f"{results['seconds']:.0f} s",
             "mean ± std over folds:",
             f"{'head':<8}" + "".join(f"{split + ' acc':>16}{split + ' wF1':>16}" for split in splits)]
    for head in results["heads"]:
        cells = []
        for split in splits:
            for metric in ("acc", "f1_weighted"):
                entry = results["summary"][split][head][metric]
                cells.append(f"{entry['mean']:.3f}±{entry['std']:.3f}".rjust(16))
        lines.append(f"{head:<8}" + "".join(cells))
    lines.append("MER2023 score of the fusion head (weighted F1 - 0.25 x valence MSE where valence is "
                 "labelled and predicted, else weighted F1):")
    for split in splits:
        fusion = results["summary"][split].get("fusion", {})
        if "mer2023" not in fusion:
            continue
        cell = f"  {split}: folds {fusion['mer2023']['mean']:.3f}±{fusion['mer2023']['std']:.3f}"
        if "valence_mse" in fusion:
            cell += f" (valence MSE {fusion['valence_mse']['mean']:.3f})"
        merged = results.get("ensemble", {}).get(split, {}).get("fusion")
        if merged:
            cell += f"; fold ensemble {merged['mer2023']:.3f}"
        lines.append(cell)
    lines.append("per fold, accuracy of each head (" + ", ".join(results["heads"]) + "):")
    for fold in results["per_fold"]:
        cells = ["  ".join(f"{fold['scores'][split][h]['acc']:.3f}" for h in results["heads"]) for split in splits]
        lines.append(f"  fold {fold['fold']} (best epoch {fold['best_epoch']}): "
                     + " | ".join(f"{split} {cell}" for split, cell in zip(splits, cells)))
    return "\n".join(lines)


def check_fold_checkpoint(cfg, fold_dir: Path) -> None:
    """An interrupted fold continues only under the options its last.pt was trained with."""
    saved = dict(load_checkpoint(fold_dir / "last.pt").get("config") or {})
    given = {k: v for k, v in cfg.to_dict().items() if k in saved}
    refuse_conflicts(fold_dir, saved, given, f"{fold_dir / 'last.pt'}")


def run_fold(cfg, k: int, fold_dir: Path, data, train_idx, val_idx, device, build_model: Callable) -> dict:
    from datasets.builders import DataBundle
    from datasets.mer import collate_padded
    from utils.run_dir import prepare_run_dir
    from utils.seed import seed_everything

    train, val = data.pool.subset(train_idx), data.pool.subset(val_idx)
    # fit() follows one test set per epoch; every test set is scored from best.pt afterwards.
    first_test = next(iter(data.tests.values()), val)
    bundle = DataBundle(train, val, first_test, data.class_names, data.modalities,
                        collate_fn=collate_padded, root=data.root)
    resume = None
    if cfg.resume and (fold_dir / "last.pt").is_file():
        check_fold_checkpoint(cfg, fold_dir)
        resume = str(fold_dir)
    elif cfg.resume and fold_dir.exists() and distributed.is_main():
        shutil.rmtree(fold_dir)  # killed before its first checkpoint: nothing to continue
    fold_cfg = dataclasses.replace(cfg, out=str(fold_dir), resume=resume)
    seed_everything(cfg.seed)
    model = build_model().to(device)
    method = method_from_config(cfg, model.heads, len(train)).to(device)
    method.setup(model)
    loaders = make_loaders(fold_cfg, bundle, device, method.needs_heldout)
    run_dir = prepare_run_dir(fold_cfg, fold_dir.name)
    extra = {"fold": k, "folds": cfg.folds, "model_type": cfg.model_type, "modalities": list(data.modalities),
             "classes": data.class_names, "run_dir": str(run_dir),
             "samples": {"train": len(train), "val": len(val), **{n: len(d) for n, d in data.tests.items()}}}
    results = fit(fold_cfg, model, method, loaders, run_dir, device, extra_results=extra)
    results["scores"] = score_checkpoint(model, run_dir / "best.pt", {"val": val, **data.tests}, cfg,
                                         collate_padded, device, run_dir)
    if distributed.is_main():
        write_json(run_dir / "results.json", results)
    return results


def run_cross_validation(cfg, data, device, out_dir: Path, build_model: Callable) -> dict:
    """Train the first ``max_folds`` (all when 0) of ``cfg.folds`` folds; return cv_results.json."""
    began = time.time()
    folds = stratified_folds(data.pool.labels, cfg.folds, cfg.fold_seed)
    names = [s.name for s in data.pool.samples]
    record_assignment(out_dir, names, folds, cfg)
    count = min(cfg.max_folds, cfg.folds) if cfg.max_folds > 0 else cfg.folds
    per_fold = []
    for k in range(1, count + 1):
        fold_dir = out_dir / f"fold{k}"
        finished = fold_dir / "results.json"
        if cfg.resume and finished.is_file() and "scores" in json.loads(finished.read_text()):
            results = json.loads(finished.read_text())  # a fold finished before the interruption
        else:
            val_idx = folds[k - 1]
            train_idx = np.setdiff1d(np.arange(len(names)), val_idx)
            results = run_fold(cfg, k, fold_dir, data, train_idx, val_idx, device, build_model)
        per_fold.append({"fold": k, "best_epoch": results["best_epoch"], "seconds": results["seconds"],
                         "selection_head": results["selection_head"], "samples": results["samples"],
                         "run_dir": results["run_dir"], "coefficients_at_best": results["coefficients_at_best"],
                         "scores": results["scores"]})
    heads = [h for h in per_fold[0]["scores"]["val"]]
    cv_results = {"dataset": cfg.dataset, "method": cfg.method, "model_type": cfg.model_type,
                  "modalities": ",".join(data.modalities), "folds": cfg.folds, "folds_run": count,
                  "fold_seed": cfg.fold_seed, "seed": cfg.seed, "epochs": cfg.epochs, "heads": heads,
                  "selection_head": per_fold[0]["selection_head"], "selection_metric": cfg.selection_metric,
                  "test_sets": list(data.tests), "skipped_samples": data.skipped,
                  "seconds": round(time.time() - began, 2), "per_fold": per_fold,
                  "summary": summarize([f["scores"] for f in per_fold]),
                  "ensemble": ensemble_scores(out_dir, count, list(data.tests)), "run_dir": str(out_dir)}
    if distributed.is_main():
        write_json(out_dir / "cv_results.json", cv_results)
    return cv_results
