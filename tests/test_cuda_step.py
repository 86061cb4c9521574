"""The training step as the CUDA path needs it, checked on the CPU: no read from the device per
step outside the logging intervals (counted), --compile equal to eager, and channels-last on by
default with CUDA only."""
from __future__ import annotations

import copy

import pytest
import torch

from config import Config, build_parser
from engines.engines_logits_com import DiagnosticMeans, StepContext, cycle, read_checks, train_one_epoch, train_step
from engines.metrics import HeadMetrics
from olmbalance import build_method
from tests.scaling_fixtures import VectorDataset, VectorModel
from tests.tiny import loader
from utils.device import channels_last, compile_model
from utils.host_reads import count_host_reads

LOOP_FILES = {"engines/engines_logits_com.py", "engines/metrics.py", "engines/trainer.py"}


def setup(method_name, **options):
    torch.manual_seed(0)
    model = VectorModel()
    method = build_method(method_name, model.heads, **options)
    coefficients = method.coefficient_parameters()
    ctx = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.Adam(model.parameters(), 1e-2),
                      coefficient_optimizer=torch.optim.Adam(coefficients, 1e-2) if coefficients else None,
                      heldout_every=1, loss_reduction="sum", progress=False)
    batches = iter(loader(VectorDataset(64), 8, True))
    heldout = cycle(loader(VectorDataset(32, seed=1), 8, True))
    # Batches made before counting: loading is host work, not a read from the device.
    return model, method, ctx, [next(batches) for _ in range(6)], heldout


@pytest.mark.parametrize("method_name", ["joint", "olm"])
def test_a_training_step_reads_nothing_back_from_the_device(method_name):
    model, method, ctx, batches, heldout = setup(method_name, **({"reference_steps": 2} if method_name == "olm" else {}))
    metrics, diagnostics = HeadMetrics(method.heads), DiagnosticMeans()
    held = [next(heldout) for _ in range(len(batches))]  # drawn ahead too
    with count_host_reads() as counts:
        for batch in batches:
            train_step(model, method, batch, iter(held), ctx, metrics, diagnostics)
    loop = {where: n for where, n in counts.items() if where in LOOP_FILES}
    assert loop == {}, f"the loop read the device per step: {loop}"
    # OLM's reference window is counted on the host too (olmbalance/olm.py keeps a host copy).
    assert sum(counts.values()) == 0, dict(counts)
    assert len(ctx.pending_checks) == len(batches) * (2 if method.coefficient_parameters() else 1)
    # Everything comes back at the logging interval, in a few reads whatever the step count.
    with count_host_reads() as counts:
        read_checks(ctx)
        metrics.compute()
    assert 0 < sum(counts.values()) <= 12 and not ctx.pending_checks


def test_the_epoch_reads_the_device_only_at_logging_intervals(monkeypatch):
    model, method, ctx, _, heldout = setup("joint")
    ctx.check_every = 5
    reads = []
    import engines.engines_logits_com as loop

    real = loop.read_checks
    monkeypatch.setattr(loop, "read_checks", lambda c: (reads.append(c.step), real(c))[1])
    train_one_epoch(model, method, loader(VectorDataset(96), 8, True), heldout, ctx, 1)
    assert ctx.step == 12 and reads == [5, 10, 12]


def test_a_non_finite_loss_is_reported_with_its_step_at_the_next_read():
    model, method, ctx, batches, heldout = setup("olm", reference_steps=2)
    metrics, diagnostics = HeadMetrics(method.heads), DiagnosticMeans()
    for number, (inputs, labels, skipped) in enumerate(batches):
        if number == 3:
            inputs = {m: x * float("nan") for m, x in inputs.items()}
        train_step(model, method, (inputs, labels, skipped), heldout, ctx, metrics, diagnostics)
    with pytest.raises(RuntimeError, match="training loss became nan at step 3"):
        read_checks(ctx)


# -- --compile ------------------------------------------------------------------------------------
def small_cnn_model():
    from models.encoders import build_encoders
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(0)
    encoders, width = build_encoders("small_cnn", ("audio", "visual"))
    return LateFusionClassifier(4, ("audio", "visual"), "concat", encoders=encoders, feature_dim=width)


def image_batches(count, batch=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [({"audio": torch.randn(batch, 1, 32, 16, generator=generator),
              "visual": torch.randn(batch, 1, 3, 16, 16, generator=generator)},
             torch.randint(0, 4, (batch,), generator=generator), 0) for _ in range(count)]


def olm_steps(model, steps=3):
    method = build_method("olm", model.heads, reference_steps=2)
    ctx = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.Adam(model.parameters(), 1e-3),
                      coefficient_optimizer=torch.optim.Adam(method.coefficient_parameters(), 1e-2),
                      heldout_every=1, loss_reduction="sum", progress=False)
    metrics = HeadMetrics(method.heads)
    heldout = iter(image_batches(steps, seed=1))
    for batch in image_batches(steps):
        train_step(model, method, batch, heldout, ctx, metrics, DiagnosticMeans())
    read_checks(ctx)
    return method, metrics.compute()


def test_compiled_model_trains_like_eager():
    """OLM steps (training forward, held-out forward with batch statistics, both optimizers) of a
    compiled small-CNN late-fusion model equal eager ones. aot_eager traces through dynamo and
    AOTAutograd as --compile does, without inductor's C compiler, so it runs on any machine."""
    from torch._dynamo.utils import counters

    eager = small_cnn_model()
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager")
    eager_method, eager_metrics = olm_steps(eager)
    counters.clear()
    compiled_method, compiled_metrics = olm_steps(compiled)
    assert counters["aot_autograd"]["ok"] >= 2  # the training and the held-out forward went through it
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name
    assert torch.allclose(eager_method.modulator.coefficients, compiled_method.modulator.coefficients,
                          rtol=1e-5, atol=1e-7)
    for head, values in eager_metrics.items():
        assert compiled_metrics[head]["loss"] == pytest.approx(values["loss"], rel=1e-4)


def test_compile_flag_reaches_the_model(monkeypatch, tiny_avdigits, tmp_path):
    import main
    import utils.device
    from tests.scaling_fixtures import TINY_FLAGS

    compiled = []
    monkeypatch.setattr(utils.device, "compile_model", lambda model: compiled.append(model) or model)
    main.main([*TINY_FLAGS, "--data-root", tiny_avdigits, "--method", "joint", "--epochs", "1", "--compile",
               "--keep-checkpoints", "none", "--out", tmp_path / "run"])
    assert len(compiled) == 1 and compiled[0].heads == ("audio", "visual", "fusion")


# -- channels-last ---------------------------------------------------------------------------------
def test_channels_last_defaults_on_with_cuda_and_off_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Config().channels_last is None
    assert not channels_last(Config(), cpu) and channels_last(Config(), cuda)
    assert channels_last(Config(channels_last=True), cpu) and not channels_last(Config(channels_last=False), cuda)
    parser = build_parser("test")
    assert parser.parse_args(["--no-channels-last"]).channels_last is False
    assert parser.parse_args(["--channels-last"]).channels_last is True
    assert "channels_last" not in vars(parser.parse_args([]))  # unset: decided per device
    option = next(a for a in parser._actions if "--channels-last" in a.option_strings)
    assert option.help.endswith("[auto]")

