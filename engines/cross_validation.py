"""K-fold cross-validation for the mid-fusion runs (main_trans.py).

The train pool is cut into seeded, stratified folds (the assignment is written to
``<out>/folds.json``). Each fold trains with ``engines.trainer.fit`` in ``<out>/fold<k>/`` and
picks its best epoch on its own validation fold; that fold's ``best.pt`` is then scored on the
validation fold and on every labelled test set. ``<out>/cv_results.json`` holds the per-fold
scores and their mean and standard deviation over folds.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader

from engines.engines_logits_com import StepContext, evaluate
from engines.methods import method_from_config
from engines.trainer import fit, make_loaders
from utils import distributed
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.run_logging import write_json

METRICS = ("acc", "f1_weighted", "f1_macro")


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


def record_assignment(out_dir: Path, names: list[str], folds: list[np.ndarray], cfg) -> None:
    """Write folds.json; when resuming, insist the folds are the ones trained before."""
    fold_of = {names[i]: k + 1 for k, indices in enumerate(folds) for i in indices}
    assignment = {"fold_seed": cfg.fold_seed, "folds": len(folds), "fold_of": dict(sorted(fold_of.items()))}
    path = out_dir / "folds.json"
    if cfg.resume:
        import json

        if json.loads(path.read_text()) != assignment:
            raise UserError(f"--resume {out_dir}: the fold assignment differs from {path} (changed data, --folds or --fold-seed)")
        return
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, assignment)


def score_checkpoint(model, checkpoint: Path, datasets: dict, heads, cfg, collate_fn, device) -> dict:
    """Per split and head: accuracy, weighted and macro F1 of the raw logits of ``checkpoint``."""
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    ctx = StepContext(device=device, network_optimizer=None, progress=cfg.progress)
    scores = {}
    for split, dataset in datasets.items():
        loader = DataLoader(dataset, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            collate_fn=collate_fn, num_workers=cfg.workers)
        labels, predictions = evaluate(model, loader, heads, ctx, f"best.pt {split}").merge_arrays()
        scores[split] = {h: {"acc": float((predictions[h] == labels).mean()) if labels.size else 0.0,
                             "f1_weighted": float(f1_score(labels, predictions[h], average="weighted", zero_division=0)),
                             "f1_macro": float(f1_score(labels, predictions[h], average="macro", zero_division=0))}
                         for h in heads}
    return scores


def summarize(fold_scores: list[dict], heads) -> dict:
    """split -> head -> metric -> {mean, std (over folds, ddof 0), per_fold}."""
    summary = {}
    for split in fold_scores[0]:
        summary[split] = {h: {m: {"per_fold": [s[split][h][m] for s in fold_scores]} for m in METRICS}
                          for h in heads}
        for head in heads:
            for entry in summary[split][head].values():
                entry["mean"] = float(np.mean(entry["per_fold"]))
                entry["std"] = float(np.std(entry["per_fold"]))
    return summary


def cv_table(results: dict) -> str:
    splits = list(results["summary"])
    lines = [f"{results['dataset']} / {results['method']} / {results['model_type']} "
             f"({results['modalities']}): {results['folds_run']} of {results['folds']} folds, best epoch "
             f"on each fold's val {results['selection_head']} accuracy, {results['seconds']:.0f} s",
             f"{'head':<8}" + "".join(f"{split + ' acc':>16}{split + ' wF1':>16}" for split in splits)]
    for head in results["heads"]:
        cells = []
        for split in splits:
            for metric in ("acc", "f1_weighted"):
                entry = results["summary"][split][head][metric]
                cells.append(f"{entry['mean']:.3f}±{entry['std']:.3f}".rjust(16))
        lines.append(f"{head:<8}" + "".join(cells))
    lines.append("per fold, accuracy of each head (" + ", ".join(results["heads"]) + "):")
    for fold in results["per_fold"]:
        cells = ["  ".join(f"{fold['scores'][split][h]['acc']:.3f}" for h in results["heads"]) for split in splits]
        lines.append(f"  fold {fold['fold']} (best epoch {fold['best_epoch']}): "
                     + " | ".join(f"{split} {cell}" for split, cell in zip(splits, cells)))
    return "\n".join(lines)


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
    resume = str(fold_dir) if cfg.resume and (fold_dir / "last.pt").is_file() else None
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
    results["scores"] = score_checkpoint(model, run_dir / "best.pt", {"val": val, **data.tests}, model.heads,
                                         cfg, collate_padded, device)
    if distributed.is_main():
        write_json(run_dir / "results.json", results)
    return results


def run_cross_validation(cfg, data, device, out_dir: Path, build_model: Callable) -> dict:
    """Train the first ``max_folds`` (all when 0) of ``cfg.folds`` folds; return cv_results.json."""
    import json

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
    heads = list(per_fold[0]["scores"]["val"])
    cv_results = {"dataset": cfg.dataset, "method": cfg.method, "model_type": cfg.model_type,
                  "modalities": ",".join(data.modalities), "folds": cfg.folds, "folds_run": count,
                  "fold_seed": cfg.fold_seed, "seed": cfg.seed, "epochs": cfg.epochs, "heads": heads,
                  "selection_head": per_fold[0]["selection_head"],
                  "test_sets": list(data.tests), "skipped_samples": data.skipped,
                  "seconds": round(time.time() - began, 2), "per_fold": per_fold,
                  "summary": summarize([f["scores"] for f in per_fold], heads), "run_dir": str(out_dir)}
    if distributed.is_main():
        write_json(out_dir / "cv_results.json", cv_results)
    return cv_results
