"""The one training loop: every training sample once per epoch, a held-out pass that leaves
the model as it found it, and method plumbing."""
import torch

from engines.engines_logits_com import StepContext, cycle, heldout_losses, train_one_epoch
from engines.methods import build_method
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


def test_heldout_pass_runs_in_eval_and_leaves_batchnorm_and_dropout_untouched():
    torch.manual_seed(0)
    model = TinyModel()
    model.train()
    method = build_method("olm", model.heads)
    batch = next(iter(loader(IndexedDataset(8), 8, False)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = heldout_losses(model, method, batch, context(model, method))
    assert model.forward_modes == [False]  # forwarded in eval mode
    assert model.training and all(m.training for m in model.modules())  # restored
    for key, value in model.state_dict().items():  # BatchNorm running stats untouched
        assert torch.equal(value, before[key]), key
    assert set(losses) == set(model.heads)
    assert all(not v.requires_grad for v in losses.values())


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
