"""ReconBoost in our trainer equals ReconBoost as its authors released it (huacong/ReconBoost,
``train.py`` ``main`` without ``--use_pretrain``, ``models/dynamic_net.py`` ``DynamicNet``,
``schedule.py``), re-stated below from their facts:

- stage ``s`` picks audio, visual, audio, ... (``schedule_model``); the learner is
  ``model.fc = net_ensemble.head`` over the modality's encoder;
- alternating stage: a fresh SGD over the learner's parameters; ``epochs_per_stage`` passes
  of ``out_join = net_ensemble.forward(data, mask_model=name)`` (the other added learners,
  ``no_grad``, times ``boost_rate``; ``c0`` viewed as ``(B, 1)`` while none was added),
  ``boosting_loss = -w1 (t * log_softmax(out_obj)).mean(-1) + w2 (t * softmax(out_join) *
  log_softmax(out_obj)).mean(-1)``, from stage 1 plus ``alpha * MSE`` of the detached softmaxes
  of ``out_obj`` and the previous modality's learner run again; ``loss.mean().backward()``;
- ``net_ensemble.add``; global rectification: a fresh SGD over the added encoders, the head
  and ``boost_rate``; ``correct_epoch`` passes of ``CE(boost_rate * sum of learners, y)``.

With momentum 0 a fresh SGD per phase is the run's one SGD, so the weights, normalization
statistics and boost rate must agree. The wiring tests pin the schedule, which parameters
each phase moves, the statistics each encoder records, the evaluated ensemble, what is logged
and saved, the settings and the recipe.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.metrics import HeadMetrics
from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.reconboost import RATE_NAME, boosting_loss
from tests.equivalence_fixtures import (CLASSES, CPU, FEATURES, MODALITIES, assert_refused, batch,
                                        configured_method, ready_method, resolved_config, sgd_run_config)
from tests.scaling_fixtures import vector_data
from utils.errors import UserError

BATCH, LR, WD = 16, 0.05, 5e-4
# The cross-cutting tests' two epochs: boosting of audio, then its rectification.
STEP_SETTINGS = {"stage_epochs": 1, "rectify_epochs": 1}


def bn_model(seed=0):
    """A LateFusionClassifier whose encoders have BatchNorm, so normalization statistics show."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, FEATURES))
                for m in MODALITIES}
    return LateFusionClassifier(CLASSES, MODALITIES, "concat", encoders=encoders, feature_dim=FEATURES)


def run_config(epochs, **options):
    return sgd_run_config("reconboost", epochs, BATCH, LR, momentum=0.0, weight_decay=WD, **options)


def ready(settings=None, seed=0):
    return ready_method("reconboost", bn_model(seed), settings)


def our_run(tmp_path, epochs, settings):
    cfg = run_config(epochs)
    model, method = ready(settings)
    fit(cfg, model, method, make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    return model, method


# -- the released training, re-stated ------------------------------------------------------------------
def released_run(epochs, stage_epochs=1, correct_epoch=1, weight1=5.0, weight2=1.0, alpha=0.5, rate=1.0,
                 train_rate=True):
    """train.py's stage loop (no pretrained learners); returns the model and the boost rate."""
    cfg = run_config(epochs)
    loaders = make_loaders(cfg, vector_data(), CPU, False)
    model = bn_model()
    head = model.unimodal_heads["audio"]
    model.unimodal_heads["visual"] = head  # common_space: model.fc = net_ensemble.head

    def learner(name, inputs):
        return head(model.encoders[name](inputs[name]))

    boost_rate = nn.Parameter(torch.tensor(rate), requires_grad=train_rate)
    c0 = random.Random(0).random()  # init_model()
    added: list[str] = []  # net_ensemble.models_name

    def ensemble_forward(inputs, mask_model):  # DynamicNet.forward
        if not added:
            return c0
        prediction = None
        with torch.no_grad():
            for name in added:
                if name != mask_model:
                    out = learner(name, inputs)
                    prediction = out if prediction is None else prediction + out
        return boost_rate * prediction

    done, stage = 0, 0
    while done < epochs:
        name = MODALITIES[stage % 2]
        pre_name = MODALITIES[(stage + 1) % 2]
        model.train()
        optimizer = torch.optim.SGD([*model.encoders[name].parameters(), *head.parameters()], lr=LR, momentum=0.0,
                                    weight_decay=WD)
        for _ in range(stage_epochs):
            if done == epochs:
                break
            for inputs, labels, _ in loaders.train:
                out_join = ensemble_forward(inputs, name)
                if stage == 0:  # not args.use_pretrain and stage == 0
                    out_join = torch.as_tensor(out_join, dtype=torch.float32).view(-1, 1).expand(len(labels), 1)
                out_obj = learner(name, inputs)
                target = torch.zeros(len(labels), CLASSES).scatter_(1, labels.view(-1, 1), 1)
                boosting = (-weight1 * (target * out_obj.log_softmax(1)).mean(-1)
                            + weight2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1))
                model.zero_grad()
                if stage == 0:
                    loss = boosting
                else:
                    pre_out_obj = learner(pre_name, inputs)
                    ga_loss = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
                    loss = boosting + alpha * ga_loss
                loss.mean().backward()
                optimizer.step()
            done += 1
        if name in added:  # DynamicNet.add: the newest learner replaces the old entry
            added.remove(name)
        added.append(name)
        parameters = [p for n in added for p in model.encoders[n].parameters()] + list(head.parameters())
        optimizer = torch.optim.SGD(parameters + ([boost_rate] if train_rate else []), lr=LR, momentum=0.0,
                                    weight_decay=WD)
        for _ in range(correct_epoch):
            if done == epochs:
                break
            for inputs, labels, _ in loaders.train:
                out = boost_rate * sum(learner(n, inputs) for n in added)  # forward_grad
                loss = F.cross_entropy(out, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            done += 1
        stage += 1
    return model, boost_rate


@pytest.mark.parametrize("epochs, settings, released", [
    (5, {}, {}),  # defaults: one boosting and one rectification epoch per stage; audio's second stage last
    (6, {"stage_epochs": 2, "rectify_epochs": 1, "weight1": 4.0, "weight2": 2.0, "alpha": 0.3, "boost_rate": 0.5},
     {"stage_epochs": 2, "correct_epoch": 1, "weight1": 4.0, "weight2": 2.0, "alpha": 0.3, "rate": 0.5}),
    (3, {"train_boost_rate": False}, {"train_rate": False}),
])
def test_our_trainer_equals_the_released_stages(tmp_path, epochs, settings, released):
    ours, method = our_run(tmp_path, epochs, settings)
    theirs, rate = released_run(epochs, **released)
    state = ours.state_dict()
    ours_rate = state.pop(RATE_NAME) if method.train_boost_rate else method.fixed_rate
    torch.testing.assert_close(state, theirs.state_dict(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_rate, rate.detach(), atol=1e-6, rtol=1e-5)
    assert (float(rate.detach()) != released.get("rate", 1.0)) == method.train_boost_rate  # trained in rectification


# -- wiring ---------------------------------------------------------------------------------------------
def test_the_schedule_alternates_modalities_and_phases_and_is_saved():
    method = build_method("reconboost", ("audio", "visual", "text", "fusion"), {"stage_epochs": 2, "rectify_epochs": 1})
    seen = []
    for epoch in range(1, 11):
        method.start_epoch(epoch, None, None)
        seen.append((method.phase, method.active, method.members, method.ensemble_members()))
    a, v, t = "audio", "visual", "text"
    assert seen == [("boost", a, (), (a,)), ("boost", a, (), (a,)), ("rectify", a, (a,), (a,)),
                    ("boost", v, (a,), (a, v)), ("boost", v, (a,), (a, v)), ("rectify", v, (a, v), (a, v)),
                    ("boost", t, (a, v), (a, v, t)), ("boost", t, (a, v), (a, v, t)),
                    ("rectify", t, (a, v, t), (a, v, t)), ("boost", a, (a, v, t), (a, v, t))]
    assert method.previous() == t
    saved = method.state_dict()["_extra_state"]
    assert saved == {"epoch": 10, "stage": 3, "phase": "boost", "active": "audio", "members": [a, v, t]}
    restored = build_method("reconboost", ("audio", "visual", "text", "fusion"), {"stage_epochs": 2, "rectify_epochs": 1})
    restored.load_state_dict(method.state_dict())
    assert (restored.stage, restored.phase, restored.members) == (3, "boost", (a, v, t))


def test_each_phase_moves_its_parameters_and_records_the_released_statistics():
    model, method = ready()
    assert model.unimodal_heads["audio"] is model.unimodal_heads["visual"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(device=CPU, network_optimizer=optimizer, progress=False)
    tracked = lambda m: int(model.encoders[m][1].num_batches_tracked)
    expected = {1: ({"encoders.audio", "unimodal_heads.audio"}, (1, 0)),
                2: ({"encoders.audio", "unimodal_heads.audio", RATE_NAME}, (1, 0)),
                3: ({"encoders.visual", "unimodal_heads.audio"}, (2, 1)),  # audio again: consolidation
                4: ({"encoders.audio", "encoders.visual", "unimodal_heads.audio", RATE_NAME}, (1, 1))}
    for epoch, (moved, recorded) in expected.items():
        method.start_epoch(epoch, model, None)
        model.train()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        counts = {m: tracked(m) for m in MODALITIES}
        diagnostics = DiagnosticMeans()
        train_step(model, method, (*batch(epoch), 0), None, ctx, HeadMetrics(method.heads), diagnostics)
        changed = {n.rsplit(".", 2)[0] if n.startswith("encoders") else n.rsplit(".", 1)[0]
                   for n, p in model.named_parameters() if not torch.equal(p, start[n])}
        assert changed == moved, epoch  # the fusion head never trains
        assert tuple(tracked(m) - counts[m] for m in MODALITIES) == recorded, epoch
        logged = diagnostics.means(method.heads)
        assert ("reconboost_consolidation" in logged) == (epoch == 3)
        if epoch == 1:  # no other learner yet: q_y = 1, the released c0
            assert logged["reconboost_ensemble_prob"] == 1.0


def test_the_boost_rate_gets_the_rectification_gradient_unscaled():
    rates = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model, method = ready()
        method.start_epoch(2, model, None)  # rectification of audio
        inputs, labels = batch(6)
        with torch.no_grad():
            a = model.unimodal_heads["audio"](model.encoders["audio"](inputs["audio"]))
        rate = torch.tensor(1.0, requires_grad=True)
        F.cross_entropy(rate * a, labels).backward()  # what b's gradient must be
        ctx = StepContext(device=CPU, network_optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False,
                          scaler=scaler)
        train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), DiagnosticMeans())
        rates.append(float(model.state_dict()[RATE_NAME]))
        assert rates[-1] == pytest.approx(1.0 - 0.1 * float(rate.grad), rel=1e-6) and method.rate_leaf is None
    assert rates[0] == pytest.approx(rates[1], rel=1e-6)


def test_evaluation_is_the_boost_rate_times_the_ensemble_members():
    model, method = ready({"boost_rate": 0.7})
    inputs, _ = batch(5)
    model.eval()
    with torch.no_grad():
        a, v = (model.unimodal_heads["audio"](model.encoders[m](inputs[m])) for m in MODALITIES)
        method.start_epoch(1, model, None)  # audio's first boosting: the ensemble it ends with is audio
        torch.testing.assert_close(method.forward_eval(model, inputs)["fusion"], 0.7 * a)
        method.start_epoch(3, model, None)
        logits = method.forward_eval(model, inputs)
    torch.testing.assert_close(logits["fusion"], 0.7 * (a + v))
    torch.testing.assert_close(logits["visual"], v)
    assert method.coefficients() == {"audio": 1.0, "visual": 1.0, "fusion": pytest.approx(0.7)}
    assert method.selection_head() == "fusion"


def test_the_boosting_loss_by_hand():
    # p = softmax(0, ln 3) = (1/4, 3/4), y = 1: log p_y = ln 0.75; q = softmax(ln 2, 0) = (2/3, 1/3), q_y = 1/3;
    # loss = -(5 - 1/3) ln 0.75 / 2 = 0.671258
    logits, others, labels = torch.tensor([[0.0, 1.0986123]]), torch.tensor([[0.6931472, 0.0]]), torch.tensor([1])
    loss, q = boosting_loss(logits, others, labels, 5.0, 1.0)
    assert float(loss) == pytest.approx(0.671258, rel=1e-5) and float(q) == pytest.approx(1 / 3)
    loss, q = boosting_loss(logits, None, labels, 5.0, 1.0)  # no other learner: q_y = 1
    assert float(loss) == pytest.approx(-4 * torch.log(torch.tensor(0.75)).item() / 2, rel=1e-6) and float(q) == 1.0


def test_a_fixed_boost_rate_is_the_methods_and_the_model_stays_plain():
    model, method = ready({"train_boost_rate": False, "boost_rate": 2.0})
    assert RATE_NAME not in model.state_dict() and float(method.state_dict()["fixed_rate"]) == 2.0
    trained_model, trained = ready()
    assert float(trained_model.state_dict()[RATE_NAME]) == 1.0 and "fixed_rate" not in trained.state_dict()
    assert trained.coefficient_parameters() == []  # the network optimizer trains it


@pytest.mark.parametrize("settings, fragment", [
    ({"weight1": -1.0}, "--reconboost-weight1"), ({"stage_epochs": 0}, "--reconboost-stage-epochs"),
    ({"rectify_epochs": -1}, "--reconboost-rectify-epochs"), ({"boost_rate": 0.0}, "--reconboost-boost-rate"),
    ({"rate": 1}, "no setting"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("reconboost", settings, fragment)


def test_models_without_a_shareable_head_are_refused():
    assert_refused("reconboost", None, "--method reconboost", heads=("audio", "fusion"))
    with pytest.raises(UserError, match="--method reconboost needs a late-fusion model"):
        build_method("reconboost", ("audio", "visual", "fusion")).setup(nn.Linear(2, 2))


def test_settings_and_the_authors_recipe_come_from_the_run_config():
    cfg = resolved_config("AVE", "reconboost", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size,
            cfg.loss_reduction) == ("sgd", 0.01, 0.9, 5e-4, 320, 0.5, 64, "mean")
    method = configured_method(cfg)
    assert (method.stage_epochs, method.rectify_epochs, method.weight1) == (4, 4, 4.0)
    method = configured_method(resolved_config("CREMAD", "reconboost", reconboost_weight2=2.0, reconboost_alpha=0.1,
                                               reconboost_train_boost_rate=False))
    assert (method.weight1, method.weight2, method.alpha, method.train_boost_rate) == (5.0, 2.0, 0.1, False)
