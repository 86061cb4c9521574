"""The one training loop: every training sample once per epoch, a held-out pass that leaves
the model as it found it, and method plumbing."""
import torch

from engines.engines_logits_com import StepContext, cycle, heldout_losses, train_one_epoch
from olmbalance import build_method
from tests.tiny import IndexedDataset, TinyModel, loader


def context(model, method, heldout_every=1):
    coefficients = method.coefficient_parameters()
    return StepContext(device=torch.device("cpu"),
                       network_optimizer=torch.optim.Adam(model.parameters(), 1e-2),
                       coefficient_optimizer=torch.optim.Adam(coefficients, 1e-2) if coefficients else None,
                       heldout_every=heldout_every, progress=False)


def test_every_training_sample_once_per_epoch_with_small_heldout_set():
    torch.manual_seed(0)
    train, heldout = IndexedDataset(50), IndexedDataset(6, seed=1)
    model = TinyModel()
    method = build_method("olm", model.heads, reference_steps=2)
    ctx = context(model, method)
    for epoch in (1, 2):
        model.seen_in_training.clear()
        train_one_epoch(model, method, loader(train, 8, True, epoch), cycle(loader(heldout, 4, True)), ctx, epoch)
        # 7 train batches per epoch while the held-out set holds fewer than 2 batches:
        # zipping the two (the released design) would have trained on 2 batches only.
        assert sorted(model.seen_in_training) == list(range(50))
    assert ctx.step == 14


def trained_tiny_model():
    """A TinyModel after a few training steps, so its running statistics are not the defaults."""
    torch.manual_seed(0)
    model = TinyModel()
    method = build_method("olm", model.heads, reference_steps=1)
    train_one_epoch(model, method, loader(IndexedDataset(32), 8, True), cycle(loader(IndexedDataset(8), 8, True)),
                    context(model, method), 1)
    return model, method


def buffer_bytes(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def expected_losses(model, method, batch, norm):
    """Per-head CE by hand: a copy in train mode with dropout off (batch), or in eval (running)."""
    import copy

    import torch.nn.functional as F

    twin = copy.deepcopy(model)
    twin.train(norm == "batch")
    for module in twin.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    inputs, labels, _ = batch
    with torch.no_grad():
        scaled = method.scale(twin(inputs))
    return {h: F.cross_entropy(scaled[h], labels) for h in method.heads}


def test_heldout_batch_norm_measures_like_training_and_touches_no_buffer():
    model, method = trained_tiny_model()
    batch = next(iter(loader(IndexedDataset(8, seed=3), 8, False)))
    before = buffer_bytes(model)
    assert int(before["encoders.audio.1.num_batches_tracked"]) > 0
    ctx = context(model, method)
    assert ctx.heldout_norm == "batch"  # the default
    losses = heldout_losses(model, method, batch, ctx)
    after = buffer_bytes(model)
    assert before.keys() == after.keys()
    for name in before:  # running mean/var and num_batches_tracked: byte-identical
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert all(not v.requires_grad for v in losses.values())
    # Equal to a train-mode forward (batch statistics) with dropout off; not to the eval forward.
    batch_stats = expected_losses(model, method, batch, "batch")
    running_stats = expected_losses(model, method, batch, "running")
    for head in method.heads:
        assert torch.allclose(losses[head], batch_stats[head], atol=1e-6), head
    assert any(not torch.allclose(losses[h], running_stats[h], atol=1e-4) for h in method.heads)
    # Twice the same batch: the same losses (no dropout, nothing updated in between).
    again = heldout_losses(model, method, batch, ctx)
    assert all(torch.equal(losses[h], again[h]) for h in method.heads)


def test_heldout_running_norm_is_the_eval_forward_and_restores_eval_mode_too():
    model, method = trained_tiny_model()
    model.forward_modes.clear()
    batch = next(iter(loader(IndexedDataset(8, seed=3), 8, False)))
    before = buffer_bytes(model)
    ctx = context(model, method)
    ctx.heldout_norm = "running"
    losses = heldout_losses(model, method, batch, ctx)
    assert model.forward_modes == [False]  # forwarded in eval mode
    expected = expected_losses(model, method, batch, "running")
    assert all(torch.allclose(losses[h], expected[h], atol=1e-6) for h in method.heads)
    assert all(torch.equal(before[k], v) for k, v in buffer_bytes(model).items())
    assert model.training and all(m.training for m in model.modules())
    # A model the caller had put in eval mode stays in eval mode, in either option.
    model.eval()
    for norm in ("batch", "running"):
        ctx.heldout_norm = norm
        heldout_losses(model, method, batch, ctx)
        assert not any(m.training for m in model.modules()), norm


def test_heldout_every_k_reuses_losses_between_passes():
    torch.manual_seed(0)
    model = TinyModel()
    method = build_method("olm", model.heads)
    heldout_batches = []

    def counting(iterator):
        for batch in iterator:
            heldout_batches.append(batch)
            yield batch

    ctx = context(model, method, heldout_every=3)
    train_one_epoch(model, method, loader(IndexedDataset(48), 8, True), counting(cycle(loader(IndexedDataset(16), 4, True))), ctx, 1)
    assert ctx.step == 6 and len(heldout_batches) == 2  # steps 0 and 3


def test_reference_tail_draws_a_fresh_heldout_batch_every_step():
    torch.manual_seed(0)
    model = TinyModel()
    # Reference window of 6 steps, its last 2 averaged into L0; the cadence alone would draw
    # once (step 0) in these 8 steps.
    method = build_method("olm", model.heads, reference_steps=6, reference_tail=2)
    ctx = context(model, method, heldout_every=100)
    drawn_at = []

    def counting(iterator):
        for batch in iterator:
            drawn_at.append(ctx.step)
            yield batch

    train_one_epoch(model, method, loader(IndexedDataset(64), 8, True), counting(cycle(loader(IndexedDataset(16), 4, True))), ctx, 1)
    assert ctx.step == 8 and drawn_at == [0, 4, 5]
    assert not method.modulator.collecting_reference and not method.heldout_due()


def test_joint_keeps_coefficients_at_one_and_draws_no_heldout():
    model = TinyModel()
    method = build_method("joint", model.heads)
    assert method.coefficient_parameters() == [] and not method.needs_heldout

    def no_heldout():
        raise AssertionError("joint must not draw held-out batches")
        yield

    train_one_epoch(model, method, loader(IndexedDataset(16), 8, True), no_heldout(), context(model, method), 1)
    assert method.coefficients() == {h: 1.0 for h in model.heads}


def test_olm_moves_coefficients_and_reports_diagnostics():
    torch.manual_seed(0)
    model = TinyModel()
    method = build_method("olm", model.heads, reference_steps=1)
    _, diagnostics = train_one_epoch(model, method, loader(IndexedDataset(64), 8, True),
                                     cycle(loader(IndexedDataset(16), 8, True)), context(model, method), 1)
    assert any(abs(w - 1.0) > 1e-4 for w in method.coefficients().values())
    for key in ("ratios", "targets_mean", "norms_mean", "G", "C"):
        assert set(diagnostics[key]) == set(model.heads)
