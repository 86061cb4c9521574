"""Guards on the numbers a run reports: each test here was shown to fail under a deliberate,
realistic bug (the mutation named in its docstring) that the rest of the suite let through."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from config import Config, build_parser, resolve_config, validate
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.methods import method_from_config
from olmbalance import build_method
from engines.metrics import HeadMetrics, f1_scores
from tests.scaling_fixtures import VectorModel, vector_data
from utils.errors import UserError

HEADS = ("audio", "visual", "fusion")
CPU = torch.device("cpu")


# -- best epoch: picked on validation, test reported for it -----------------------------------------
def scripted_metrics(acc_by_head: dict[str, float], samples: int = 20) -> HeadMetrics:
    """HeadMetrics whose accuracy per head is exactly the given fraction of ``samples``."""
    labels = torch.arange(samples) % 3
    metrics = HeadMetrics(HEADS)
    logits = {}
    for head, acc in acc_by_head.items():
        right = round(acc * samples)
        predicted = torch.where(torch.arange(samples) < right, labels, (labels + 1) % 3)
        logits[head] = F.one_hot(predicted, 3).float()
    metrics.update(logits, labels, {h: torch.tensor(1.0) for h in HEADS})
    return metrics


# Validation peaks at epoch 2, test at epoch 3, and the last epoch is 4.
VAL_FUSION = [0.5, 0.9, 0.7, 0.8]
TEST_FUSION = [0.6, 0.5, 0.95, 0.7]


def test_best_epoch_is_picked_on_val_and_reports_that_epochs_test(tmp_path, monkeypatch):
    """Mutations caught: best epoch picked on test accuracy; always reporting the last epoch."""
    import engines.trainer as trainer

    def scripted_evaluate(model, loader, heads, ctx, desc="eval", *rest, **options):
        epoch, split = re.match(r"epoch (\d+) (\w+)", desc).groups()
        fusion = (VAL_FUSION if split == "val" else TEST_FUSION)[int(epoch) - 1]
        return scripted_metrics({"audio": 0.4, "visual": 0.3, "fusion": fusion})

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    cfg = Config(method="joint", epochs=4, batch_size=32, progress=False, plots=False, device="cpu")
    model = VectorModel()
    method = build_method("joint", model.heads)
    results = trainer.fit(cfg, model, method, trainer.make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["val"]["fusion"]["acc"] for row in rows] == VAL_FUSION
    best = max(range(len(rows)), key=lambda i: (rows[i]["val"]["fusion"]["acc"], -i))
    assert results["best_epoch"] == rows[best]["epoch"] == 2
    assert results["test"]["fusion"]["acc"] == rows[best]["test"]["fusion"]["acc"] == 0.5
    assert results["val"] == {h: {k: rows[best]["val"][h][k] for k in ("acc", "f1", "loss", "norm")} for h in HEADS}
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["metrics"]["test"]["fusion"]["acc"] == 0.5


# -- accuracy and macro-F1 against scikit-learn -------------------------------------------------------
def test_accuracy_and_macro_f1_match_scikit_learn_on_known_predictions():
    """Mutation caught: macro F1 switched to micro (or weighted)."""
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 0, 0, 0, 0, 1, 1, 0, 2, 2])
    metrics = HeadMetrics(["fusion"])
    for part in (slice(0, 4), slice(4, 10)):  # two batches
        metrics.update({"fusion": F.one_hot(torch.as_tensor(predicted[part]), 3).float()},
                       torch.as_tensor(labels[part]), {"fusion": torch.tensor(0.0)})
    result = metrics.compute()["fusion"]
    assert result["acc"] == pytest.approx(accuracy_score(labels, predicted)) == pytest.approx(0.7)
    macro = f1_score(labels, predicted, average="macro")
    # per-class F1 5/6, 2/5, 2/3 -> their mean, unlike micro (= accuracy) or weighted F1
    assert macro == pytest.approx((5 / 6 + 2 / 5 + 2 / 3) / 3)
    assert result["f1"] == pytest.approx(macro)
    assert not math.isclose(result["f1"], 0.7, abs_tol=1e-3)
    assert not math.isclose(result["f1"], f1_score(labels, predicted, average="weighted"), abs_tol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_f1_scores_match_scikit_learn_with_classes_missing_from_either_side(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=int(rng.integers(1, 40)))
    predicted = np.where(rng.random(labels.size) < 0.5, labels, rng.integers(2, 9, size=labels.size))
    macro, weighted = f1_scores(labels, predicted)
    assert macro == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0))
    assert weighted == pytest.approx(f1_score(labels, predicted, average="weighted", zero_division=0))


# -- OLM inside the loop ------------------------------------------------------------------------------
class LinearHeads(nn.Module):
    """No normalization, no dropout: a forward depends on the inputs alone, so the expected
    losses and gradients can be recomputed exactly outside the loop."""

    def __init__(self, classes=3):
        super().__init__()
        self.heads = HEADS
        self.audio = nn.Linear(4, classes)
        self.visual = nn.Linear(4, classes)
        self.fusion_layer = nn.Linear(8, classes)

    def forward(self, inputs):
        return {"audio": self.audio(inputs["audio"]), "visual": self.visual(inputs["visual"]),
                "fusion": self.fusion_layer(torch.cat([inputs["audio"], inputs["visual"]], dim=1))}


def batch_of(dataset, indices):
    items = [dataset[i] for i in indices]
    inputs = {m: torch.stack([x[m] for x, _ in items]) for m in ("audio", "visual")}
    return inputs, torch.tensor([y for _, y in items]), 0


def sgd_context(model, method) -> StepContext:
    """Network frozen (lr 0); coefficients by plain SGD at lr 1, so w_before - w_after = w.grad."""
    return StepContext(device=CPU, network_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                       coefficient_optimizer=torch.optim.SGD(method.coefficient_parameters(), lr=1.0),
                       heldout_every=1, progress=False)


def expected_coefficient_gradient(model, modulator, batch, heldout_batch):
    """d/dw of (sum of the modulated CEs) + the norm loss, with held-out CEs on w * z."""
    modulator = copy.deepcopy(modulator)
    w = modulator.coefficients
    inputs, labels, _ = batch
    with torch.no_grad():
        heldout_scaled = modulator.scale(model(heldout_batch[0]))
        heldout = {h: F.cross_entropy(heldout_scaled[h], heldout_batch[1]) for h in HEADS}
    logits = model(inputs)
    train = {h: F.cross_entropy(modulator.scale(logits)[h], labels) for h in HEADS}
    ce_grad, = torch.autograd.grad(sum(train.values()), w)
    norm_grad, = torch.autograd.grad(modulator.norm_loss(logits, train, heldout), w)
    return ce_grad, norm_grad, heldout


def test_olm_step_sends_both_losses_to_the_coefficients_with_heldout_on_scaled_logits():
    """Mutations caught: the CE's gradient to the coefficients dropped (e.g. w detached in
    ``scale``); held-out losses computed on the raw logits z instead of w * z."""
    torch.manual_seed(0)
    data = vector_data()
    model = LinearHeads()
    method = build_method("olm", HEADS, reference_steps=1)
    ctx = sgd_context(model, method)
    metrics, diagnostics = HeadMetrics(HEADS), DiagnosticMeans()
    # Step 1 fills the reference; then coefficients far from 1 make raw and scaled logits differ.
    train_step(model, method, batch_of(data.train, range(16)), iter([batch_of(data.val, range(8))]), ctx,
               metrics, diagnostics)
    with torch.no_grad():
        method.modulator.coefficients.copy_(torch.tensor([0.5, 2.0, 1.5]))
    batch, heldout_batch = batch_of(data.train, range(16, 32)), batch_of(data.val, range(8, 16))
    ce_grad, norm_grad, heldout = expected_coefficient_gradient(model, method.modulator, batch, heldout_batch)
    assert ce_grad.abs().min() > 1e-4 and norm_grad.abs().min() > 1e-4  # both parts matter

    before = method.modulator.coefficients.detach().clone()
    train_step(model, method, batch, iter([heldout_batch]), ctx, metrics, diagnostics)
    for head in HEADS:
        assert float(ctx.heldout_cache[head]) == pytest.approx(float(heldout[head]), rel=1e-5), head
    applied = before - method.modulator.coefficients.detach()
    torch.testing.assert_close(applied, ce_grad + norm_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reference_steps, expected", [(0, 6), (2, 2)])
def test_reference_window_is_what_the_config_asks_for(tmp_path, reference_steps, expected):
    """Mutation caught: a one-batch instead of a one-epoch reference (--reference-steps 0)."""
    from engines.trainer import fit, make_loaders

    cfg = Config(method="olm", epochs=1, batch_size=16, heldout_batch_size=8, reference_steps=reference_steps,
                 progress=False, plots=False, device="cpu")
    data = vector_data()  # 96 training samples: 6 steps per epoch at batch 16
    model = VectorModel()
    method = method_from_config(cfg, model.heads, len(data.train))
    seen = []
    norm_loss = method.modulator.norm_loss

    def recording(logits, train, heldout=None):
        seen.append(bool(method.modulator.collecting_reference))
        return norm_loss(logits, train, heldout)

    method.modulator.norm_loss = recording
    fit(cfg, model, method, make_loaders(cfg, data, CPU, True), tmp_path, CPU)
    assert method.modulator.reference_steps == expected
    assert int(method.modulator.reference_count) == expected
    assert seen == [True] * expected + [False] * (6 - expected)


# -- two processes against one, on the same global batches ----------------------------------------------
def ddp_part(rank: int, world: int, out_dir) -> None:
    """This file's share of the two-rank session (tests/ddp_session.py)."""
    torch.save(one_olm_step(rank, world), out_dir / f"step-rank{rank}.pt")


def one_olm_step(rank: int, world: int) -> torch.Tensor:
    """Two OLM steps on this rank's slice of fixed global batches (16 train, 8 held-out);
    returns the change of the coefficients in the second step (plain SGD, lr 1)."""
    torch.manual_seed(0)
    data = vector_data()
    model = LinearHeads()
    method = build_method("olm", HEADS, reference_steps=1)
    ctx = sgd_context(model, method)

    def part(dataset, start, size):
        share = size // world
        return batch_of(dataset, range(start + rank * share, start + (rank + 1) * share))

    metrics, diagnostics = HeadMetrics(HEADS), DiagnosticMeans()
    train_step(model, method, part(data.train, 0, 16), iter([part(data.val, 0, 8)]), ctx, metrics, diagnostics)
    with torch.no_grad():
        method.modulator.coefficients.copy_(torch.tensor([0.5, 2.0, 1.5]))
    train_step(model, method, part(data.train, 16, 16), iter([part(data.val, 8, 8)]), ctx, metrics, diagnostics)
    return torch.tensor([0.5, 2.0, 1.5]) - method.modulator.coefficients.detach()


def test_two_processes_step_the_coefficients_like_one(ddp_session):
    """Mutation caught: the coefficient gradient summed instead of averaged over processes."""
    single = one_olm_step(0, 1)
    for rank in range(2):
        torch.testing.assert_close(torch.load(ddp_session / "guards" / f"step-rank{rank}.pt"), single,
                                   rtol=1e-4, atol=1e-6)


# -- --ogm-alpha reaches OGM-GE ---------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_ogm_alpha_from_the_command_line_reaches_the_method(alpha):
    """Mutation caught: --ogm-alpha ignored (the method built with its default alpha)."""
    cfg = resolve_config(build_parser("t").parse_args(["--method", "ogm_ge", "--ogm-alpha", str(alpha)]))
    method = method_from_config(cfg, HEADS, 96)
    assert method.alpha == alpha


# -- --config precedence, unknown keys, validate() ------------------------------------------------------
def parse(*flags):
    return resolve_config(build_parser("t").parse_args([str(f) for f in flags]))


def test_config_file_overrides_dataset_defaults_and_flags_override_the_file(tmp_path):
    """Mutations caught: the file read after the flags, or the dataset defaults after the file."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.005\nbatch_size: 48\nepochs: 7\n")
    from config import get_dataset_spec

    registered = get_dataset_spec("AVDigits").defaults
    assert parse().lr == registered["lr"] and parse().batch_size == registered["batch_size"]
    assert registered["lr"] != Config.lr  # the dataset's defaults beat the generic ones
    from_file = parse("--config", path)
    assert (from_file.lr, from_file.batch_size, from_file.epochs) == (0.005, 48, 7)
    flagged = parse("--config", path, "--lr", 0.02)
    assert (flagged.lr, flagged.batch_size) == (0.02, 48)
    cremad = tmp_path / "cremad.yaml"
    cremad.write_text("dataset: cremad\n")
    assert parse("--config", cremad).image_size == 224 and parse("--config", cremad).dataset == "CREMAD"


def test_resumed_options_sit_between_defaults_and_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "config": {**Config(lr=0.003, epochs=4, batch_size=40).to_dict(),
                                        "out": "elsewhere"}}, run / "last.pt")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 9\n")
    cfg = parse("--resume", run, "--config", path, "--batch-size", 24)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.out) == (0.003, 9, 24, None)


@pytest.mark.parametrize("text, fragment", [
    ("lr: 0.1\nlearning_rate: 0.1\n", "unknown keys: learning_rate"),
    ("epochs: [unclosed\n", "cannot read --config"),
])
def test_config_file_mistakes_are_one_sentence(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)) as stop:
        parse("--config", path)
    assert str(path) in str(stop.value)


@pytest.mark.parametrize("field, value, fragment", [
    ("epochs", 0, "--epochs must be at least 1"), ("batch_size", -2, "--batch-size must be at least 1"),
    ("heldout_every", 0, "--heldout-every must be at least 1"), ("lr", 0.0, "--lr must be positive"),
    ("coef_lr", -1.0, "--coef-lr must be positive"), ("target_scale", "median", "--target-scale 'median'"),
    ("fusion", "foo", "--fusion 'foo'"), ("amp", "fp8", "--amp 'fp8'"),
    ("keep_checkpoints", "some", "--keep-checkpoints 'some'"),
])
def test_validate_refuses_values_that_would_fail_later(field, value, fragment):
    """Mutation caught: validate() not called, or a check removed."""
    with pytest.raises(UserError, match=re.escape(fragment)):
        validate(Config(**{field: value}))
    validate(Config())  # the defaults pass
