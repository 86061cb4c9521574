"""Modality-imbalance diagnostics of a trained late-fusion run, read from its best-on-validation
checkpoint (``best.pt``): what each encoder learned, and what the fusion head uses of it.

    python -m engines.imbalance RUN_DIR     # recompute them for an existing run folder

``main.py`` runs them at the end of training (``--no-imbalance`` turns them off); they go into
``results.json`` under ``"imbalance"``, the end-of-run table and the comparison report
(utils/compare.py), and the run folder gets ``predictions.npz`` (the selection head's test
probabilities, which the comparison's unimodal-ensemble row averages).

Every measurement starts from the encoder features of each split, computed once: encoders in
eval mode, the evaluation view of every split (no augmentation, the evaluation frames), no
gradient, float32. The protocol is fixed and the same for every method:

**Linear probe** of each modality's frozen features (``probe_modality``): features
standardized with the training split's mean and standard deviation; a multinomial logistic
regression (a linear layer with bias, zero-initialized, float32) minimizing the mean
cross-entropy plus ``l2/2 * ||W||^2`` (bias not penalized) by full-batch L-BFGS (strong-Wolfe
line search, at most ``PROBE_MAX_ITER`` iterations), fitted on the **training split only**,
once per ``l2`` in ``PROBE_L2_GRID``; the ``l2`` with the highest **validation** accuracy is
kept (ties: the larger ``l2``); that probe is scored on validation and test. Test features
and labels are never passed to the fitting or the selection. Zero initialization makes the
fit deterministic (no random draw).

**Reliance** of the fusion head on each modality (``reliance``): fusion accuracy when that
modality's features are replaced by those of other samples of the same split (a seeded
derangement: every sample gets another sample's features, the other modalities keep their
own), averaged over ``RELIANCE_REPEATS`` derangements; ``drop`` = intact accuracy minus that.
A head that ignores a modality drops 0; one that reads only it falls to chance.

**Shapley contribution** of each modality to fusion accuracy (``shapley``), the imbalance
measure BalanceBenchmark reports (GeWu-Lab/BalanceBenchmark, ``Calculate_Shapley`` in
``balancemm/evaluation/modalitys.py``, commit 4c1482f): the value of a subset S of modalities
is the fusion head's accuracy when the modalities outside S are absent, and
``phi_m = sum over S not holding m of |S|! (M-|S|-1)! / M! * (v(S + m) - v(S))``, so the
values add up to ``v(all) - v(none)``. Absent modalities are masked as BalanceBenchmark's
models do (``validation_step`` -> ``forward(padding=...)`` in ``balancemm/models/
avclassify_model.py``): the modality's *input* is replaced by zeros and still goes through
its encoder in eval mode; v(none) is the accuracy with every input zeroed. An eval-mode
encoder maps an all-zero input to the same feature vector for every sample, so that vector
is computed once per modality (``SplitFeatures.masked``) and put in place of the features.
BalanceBenchmark computes it on the test split with its best checkpoint; we report
validation and test.

Reliance and Shapley read the fusion logits the run is evaluated with: ``predict(model,
inputs)`` (main.py passes the method's ``forward_eval``; MLA fuses its unimodal heads there)
is called with the encoders bypassed and the features as inputs. Runs that train one
modality alone (``audio_only``, ``visual_only``: the fusion head never trained) get probes
only.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from utils.predictions import PREDICTIONS_FILE, read_predictions, write_predictions  # noqa: F401
from utils.scores import f1_scores
from utils.errors import UserError

log = logging.getLogger(__name__)

PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PROBE_MAX_ITER = 50
RELIANCE_REPEATS = 5
# Derangements come from their own generator, seeded with seed + this offset + the modality's index.
RELIANCE_SEED_OFFSET = 104729
SPLITS = ("val", "test")
FUSION_CHUNK = 4096  # samples per fusion-head call when scoring a whole split
NO_MODALITY = "none"  # the Shapley subset with every modality absent

Predict = Callable[[nn.Module, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


@dataclass
class SplitFeatures:
    """One split's encoder features (modality -> (N, D) float32), labels (N,), and each
    modality's feature for an all-zero input (D,): what an absent modality looks like."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    masked: dict[str, torch.Tensor]


def evaluation_view(dataset):
    """The split as evaluation reads it: the training split loses its augmentation and draws
    the evaluation frames (AVClipDataset); other datasets are returned unchanged."""
    from datasets.av_base import AVClipDataset

    if isinstance(dataset, AVClipDataset) and dataset.train:
        return AVClipDataset(dataset.clips, dataset.audio, dataset.visual, train=False,
                             spectrogram_fn=dataset.spectrogram_fn)
    return dataset


def split_batches(data, batch_size: int, workers: int = 0, splits: Sequence[str] = ("train", *SPLITS)):
    """(split, batch) pairs over the evaluation view of each split, in order, from one loader
    (one set of worker processes for every split); no batch mixes two splits."""
    views = [evaluation_view(getattr(data, s)) for s in splits]
    batches, owners, offset = [], [], 0
    for split, view in zip(splits, views):
        for start in range(0, len(view), batch_size):
            batches.append(list(range(offset + start, offset + min(start + batch_size, len(view)))))
            owners.append(split)
        offset += len(view)
    loader = DataLoader(ConcatDataset(views), batch_sampler=batches, num_workers=workers,
                        collate_fn=data.collate_fn)
    return zip(owners, loader)


@torch.no_grad()
def extract_features(model: nn.Module, batches, device: torch.device) -> dict[str, SplitFeatures]:
    """Encoder features of every readable sample of ``batches`` ((split, batch) pairs), the
    encoders in eval mode; per split."""
    was_training = model.training
    model.eval()
    features: dict[str, dict[str, list[torch.Tensor]]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    masked: dict[str, torch.Tensor] = {}
    try:
        for split, (inputs, batch_labels, _) in batches:
            if inputs is None:
                continue
            x = {m: inputs[m].to(device) for m in model.modalities}
            # encode(): the features the heads read, all modalities at once (encoders that exchange
            # through MMTM blocks, Greedy, need each other); per encoder for models without it.
            encode = getattr(model, "encode", None) or (lambda xs: {m: model.encoders[m](xs[m]) for m in xs})
            for m, f in encode(x).items():
                features.setdefault(split, {}).setdefault(m, []).append(f.float())
            if not masked:  # an all-zero sample's features: what an absent modality looks like
                masked = {m: f.float()[0] for m, f in encode({m: torch.zeros_like(v[:1]) for m, v in x.items()}).items()}
            labels.setdefault(split, []).append(batch_labels.to(device))
    finally:
        model.train(was_training)
    return {split: SplitFeatures({m: torch.cat(v) for m, v in features[split].items()}, torch.cat(labels[split]),
                                 masked) for split in labels}


# -- linear probes ----------------------------------------------------------------------------
def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
                 max_iter: int = PROBE_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a multinomial logistic regression on (x, y): mean CE + l2/2 ||W||^2, full-batch
    L-BFGS from zeros (deterministic), on ``x``'s device."""
    x, y = x.float(), y.long().to(x.device)
    weight = torch.zeros(classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (as the training loop computes them)."""
    predictions = logits.argmax(dim=1).cpu().numpy()
    truth = labels.cpu().numpy()
    return {"acc": float((predictions == truth).mean()), "f1": f1_scores(truth, predictions)[0]}


def probe_modality(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                   classes: int, grid: Sequence[float] = PROBE_L2_GRID) -> dict:
    """Fit on ``train`` (features, labels) for every ``l2`` of ``grid``; keep the best on
    ``val``. Returns the kept ``l2``, its train/val scores and the probe itself (``score``
    applies it to other features: the caller scores test with it). No test data comes in."""
    x_train, y_train = train[0].detach().float(), train[1]
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)

    def standardized(x):
        return (x.detach().float().to(mean.device) - mean) / std

    x_train, x_val = standardized(x_train), standardized(val[0])
    best = None
    for l2 in sorted(grid):
        weight, bias = fit_logistic(x_train, y_train, classes, l2)
        accuracy = scores(x_val @ weight.t() + bias, val[1])["acc"]
        if best is None or accuracy >= best[0]:  # ties go to the larger l2
            best = (accuracy, l2, weight, bias)
    _, l2, weight, bias = best

    def score(features, labels):
        return scores(standardized(features) @ weight.t() + bias, labels)

    return {"l2": l2, "train": score(*train), "val": score(*val), "score": score,
            "weight": weight, "bias": bias}


def linear_probes(splits: Mapping[str, SplitFeatures], classes: int) -> dict[str, dict]:
    """Per modality: the probe fitted on train, selected on val, scored on val and test."""
    result = {}
    for m in splits["train"].features:
        probe = probe_modality((splits["train"].features[m], splits["train"].labels),
                               (splits["val"].features[m], splits["val"].labels), classes)
        result[m] = {"l2": probe["l2"], "train": probe["train"], "val": probe["val"],
                     **{s: probe["score"](splits[s].features[m], splits[s].labels)
                        for s in splits if s not in ("train", "val")}}
    return result


# -- the fusion head: reliance and Shapley ----------------------------------------------------
@contextlib.contextmanager
def encoders_bypassed(model: nn.Module):
    """The model's encoders replaced by identities: ``model(features)`` runs the heads only.
    A forward compiled in place (``--compile``: ``nn.Module.compile``) runs eagerly meanwhile,
    so the changed encoders and split sizes trigger no recompilation."""
    saved = dict(model.encoders.items())
    compiled = model.__dict__.get("_compiled_call_impl")
    try:
        model._compiled_call_impl = None
        for m in saved:
            model.encoders[m] = nn.Identity()
        yield model
    finally:
        for m, encoder in saved.items():
            model.encoders[m] = encoder
        model._compiled_call_impl = compiled


def default_predict(model: nn.Module, inputs):
    return model(inputs)


def head_logits(model: nn.Module, features: Mapping[str, torch.Tensor], predict: Predict | None = None,
                chunk: int = FUSION_CHUNK) -> dict[str, torch.Tensor]:
    """Every head's logits for ``features`` (modality -> (N, D)), as ``predict`` evaluates the
    model, encoders bypassed, eval mode."""
    predict = predict or default_predict
    count = len(next(iter(features.values())))
    parts: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), encoders_bypassed(model):
            for start in range(0, count, chunk):
                logits = predict(model, {m: f[start:start + chunk] for m, f in features.items()})
                for head, z in logits.items():
                    if torch.is_tensor(z) and z.dim() == 2:
                        parts.setdefault(head, []).append(z.float())
    finally:
        model.train(was_training)
    return {head: torch.cat(z) for head, z in parts.items()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(dim=1) == labels).sum()) / len(labels)


def derangement(count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices ``source`` with ``source[i] != i`` for every i (count >= 2): a random cyclic
    order, each sample taking the features of the next one in it."""
    order = torch.randperm(count, generator=generator)
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    return source


def fusion_accuracy(fuse: Callable[[dict], torch.Tensor], features: Mapping[str, torch.Tensor],
                    labels: torch.Tensor) -> float:
    return accuracy(fuse(dict(features)), labels)


def reliance(fuse: Callable[[dict], torch.Tensor], split: SplitFeatures, seed: int,
             repeats: int = RELIANCE_REPEATS) -> dict:
    """Intact fusion accuracy, and per modality the mean accuracy with its features taken from
    other samples (``repeats`` seeded derangements) and the drop from intact."""
    intact = fusion_accuracy(fuse, split.features, split.labels)
    result: dict = {"intact": intact}
    count = len(split.labels)
    for index, m in enumerate(split.features):
        generator = torch.Generator().manual_seed(seed + RELIANCE_SEED_OFFSET + index)
        shuffled = []
        for _ in range(repeats):
            source = derangement(count, generator).to(split.features[m].device)
            shuffled.append(fusion_accuracy(fuse, {**split.features, m: split.features[m][source]}, split.labels))
        mean = sum(shuffled) / len(shuffled)
        result[m] = {"acc": mean, "drop": intact - mean}
    return result


def subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset) or NO_MODALITY


def shapley(fuse: Callable[[dict], torch.Tensor], split: SplitFeatures) -> dict:
    """Each modality's Shapley value of fusion accuracy over modality subsets (absent ones get
    their zero-input feature), and the accuracy of every subset (``subsets``)."""
    modalities = list(split.features)
    count = len(modalities)
    values: dict[tuple[str, ...], float] = {}
    for size in range(count + 1):
        for subset in itertools.combinations(modalities, size):
            features = {m: split.features[m] if m in subset else split.masked[m].expand_as(split.features[m])
                        for m in modalities}
            values[subset] = fusion_accuracy(fuse, features, split.labels)
    contributions = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = 0.0
        for size in range(count):
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            for subset in itertools.combinations(others, size):
                with_m = tuple(o for o in modalities if o in subset or o == m)
                total += weight * (values[with_m] - values[subset])
        contributions[m] = total
    return {"values": contributions, "subsets": {subset_name(s): v for s, v in values.items()}}


# -- a whole run ------------------------------------------------------------------------------
def diagnose(model: nn.Module, batches, classes: int, device: torch.device, seed: int = 0,
             selection_head: str = "fusion", predict: Predict | None = None) -> tuple[dict, dict]:
    """The diagnostics of ``model`` as it is (load the checkpoint first) from ``batches``
    ((split, batch) pairs of train, val and test: ``split_batches``), and the selection head's
    probabilities per split of ``SPLITS`` (``{"test_probs": ..., "test_labels": ...}``)."""
    began = time.perf_counter()
    splits = extract_features(model, batches, device)
    missing = [s for s in ("train", *SPLITS) if s not in splits]
    if missing:
        raise UserError(f"no readable sample in the {', '.join(missing)} split(s) for the imbalance diagnostics")
    result: dict = {"protocol": protocol(), "selection_head": selection_head,
                    "probe": linear_probes(splits, classes)}
    predictions, intact = {}, {}
    for s in SPLITS:
        logits = head_logits(model, splits[s].features, predict)
        intact[s] = scores(logits[selection_head], splits[s].labels)
        predictions[f"{s}_probs"] = torch.softmax(logits[selection_head], dim=1).cpu().numpy()
        predictions[f"{s}_labels"] = splits[s].labels.cpu().numpy()
    result["intact"] = intact
    if selection_head == "fusion":
        def fuse(features):
            return head_logits(model, features, predict)["fusion"]

        result["reliance"] = {s: reliance(fuse, splits[s], seed) for s in SPLITS}
        result["shapley"] = {s: shapley(fuse, splits[s]) for s in SPLITS}
    else:
        result["reliance"] = result["shapley"] = None  # the fusion head never trained
    result["samples"] = {s: int(len(f.labels)) for s, f in splits.items()}
    result["seconds"] = round(time.perf_counter() - began, 2)
    return result, predictions


def protocol() -> dict:
    """The fixed protocol, recorded beside the numbers (see the module docstring)."""
    return {"probe": f"logistic regression on train-standardized features, L-BFGS <= {PROBE_MAX_ITER} "
                     f"iterations from zeros, l2 in {list(PROBE_L2_GRID)} picked on val accuracy",
            "reliance": f"{RELIANCE_REPEATS} seeded derangements of one modality's features",
            "shapley": "fusion accuracy over modality subsets, absent inputs zeroed (BalanceBenchmark)"}


def diagnose_run(run_dir: Path, model: nn.Module, data, cfg, device: torch.device,
                 selection_head: str = "fusion", predict: Predict | None = None) -> dict:
    """Load ``run_dir/best.pt`` into ``model``, compute the diagnostics, write predictions.npz;
    returns results.json's ``"imbalance"`` entry."""
    from utils.checkpoint import load_checkpoint

    if not hasattr(model, "encoders") or not hasattr(model, "modalities"):
        raise UserError(f"imbalance diagnostics need a late-fusion model with per-modality encoders; "
                        f"{type(model).__name__} has none")
    payload = load_checkpoint(Path(run_dir) / "best.pt", map_location=device)
    model.load_state_dict(payload["model"])
    batch = cfg.eval_batch_size or 2 * cfg.batch_size
    result, predictions = diagnose(model, split_batches(data, batch, cfg.workers), len(data.class_names),
                                   device, cfg.seed, selection_head, predict)
    result["checkpoint_epoch"] = payload.get("epoch")
    result["predictions"] = write_predictions(run_dir, predictions, selection_head).name
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engines.imbalance",
        description="Compute a run folder's imbalance diagnostics from its best.pt (linear probes per "
                    "modality, the fusion head's reliance on each modality, Shapley values), write "
                    "predictions.npz and results.json's 'imbalance' entry. See engines/imbalance.py.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of main.py holding best.pt")
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N [auto]")
    parser.add_argument("--data-root", help="dataset root, when it moved since training")
    args = parser.parse_args(argv)
    from config import get_dataset_spec, load_config_dict
    from datasets.builders import build_data
    from engines.methods import model_and_method
    from utils.checkpoint import load_checkpoint
    from utils.device import resolve_device
    from utils.run_logging import write_json

    run_dir = Path(args.run_dir)
    payload = load_checkpoint(run_dir / "best.pt")
    cfg = load_config_dict(payload["config"])
    if args.data_root:
        cfg.data_root = args.data_root
    spec = get_dataset_spec(cfg.dataset)
    if spec.kind != "av":
        raise UserError(f"{run_dir} is a {spec.name} run; the diagnostics cover late-fusion runs of main.py")
    device = resolve_device(args.device)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)  # as the run trained (AV-Digits: one thread)
    data = build_data(cfg, spec)
    # The run's method shapes the model it trained (Greedy's MMTM blocks, AMCo's output layer)
    # and how its heads are evaluated (MLA's fused prediction): both as main.py had them.
    model, method = model_and_method(cfg, len(data.class_names), data.modalities, len(data.train), device)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    head = results.get("selection_head", "fusion")
    imbalance = diagnose_run(run_dir, model, data, cfg, device, head, predict=method.forward_eval)
    recorded = (payload.get("metrics") or {}).get("test", {}).get(head, {}).get("acc")
    if recorded is not None and abs(recorded - imbalance["intact"]["test"]["acc"]) > 1e-6:
        log.warning("the %s head's test accuracy recomputed here (%.4f) differs from the run's (%.4f): the "
                    "data changed since the run; "
                    "reliance and Shapley describe the model's own heads", head,
                    imbalance["intact"]["test"]["acc"], recorded)
    if results:
        from utils.report import read_metrics, summary_table

        results["imbalance"] = imbalance
        write_json(results_path, results)
        print(summary_table(results, rows=read_metrics(run_dir)))
    else:
        print(json.dumps(imbalance, indent=1))
    print(f"wrote {run_dir / imbalance['predictions']}" + (f" and {results_path}" if results else ""))


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
