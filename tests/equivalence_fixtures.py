"""Pieces the methods' equivalence tests (``tests/test_equivalence_<name>.py``) share, so that
each test module keeps only what is its method's own:

- the small late-fusion model with BatchNorm in its encoders that most of them train on the CPU
  (``bn_late_fusion``; BatchNorm makes a forward in the wrong mode show), its sizes
  (``CLASSES``, ``FEATURES``, ``INPUTS``), and what of it the released code has
  (``released_parameters``);
- a method built and set up on a model (``ready_method``), an SGD run's config
  (``sgd_run_config``), the config a command line resolves to (``resolved_config``) and the
  method such a run builds (``configured_method``);
- the released scripts' plain SGD loop, which a test fills with the released loss
  (``released_epochs``);
- our loop's training step (``one_step``, ``modulation_per_step``), seeded batches (``batch``)
  and an ``EpochData`` over fixed batches that records what a method read (``BatchList``);
- the refusal the tests check for every method (``assert_refused``).
"""
from __future__ import annotations

import argparse

import pytest
import torch

from config import Config, resolve_config
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.metrics import HeadMetrics
from olmbalance import build_method
from olmbalance.base import EpochData
from tests.tiny import tiny_late_fusion
from utils.errors import UserError

CPU = torch.device("cpu")
CLASSES, FEATURES, INPUTS = 3, 8, 4  # the models' classes, encoder features, input features per modality
MODALITIES = ("audio", "visual")
HEADS = ("audio", "visual", "fusion")
NOT_RELEASED = "unimodal_heads."  # fusion_only's detached read-outs: not part of the released model


# -- the model ----------------------------------------------------------------------------------
def bn_late_fusion(seed=0, fusion="concat"):
    """Two MLP encoders with BatchNorm (eval and train mode give different features) and the
    ``fusion`` head, ``CLASSES`` classes."""
    return tiny_late_fusion(fusion, CLASSES, FEATURES, seed, inputs=INPUTS, batch_norm=True)


def released_parameters(model):
    """The model's state less the read-outs, which the released models do not have."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(NOT_RELEASED)}


# -- methods and runs ------------------------------------------------------------------------------
def ready_method(name, model, settings=None, **keywords):
    """``model`` and the method ``name`` built for its heads (``settings``, ``keywords`` as
    ``build_method`` takes them) and set up on it."""
    method = build_method(name, model.heads, settings, **keywords)
    method.setup(model)
    return model, method


def sgd_run_config(method, epochs, batch_size, lr, **options):
    """A CPU run of ``method``: SGD (momentum 0.9, weight decay 1e-4), mean losses, seed 0, no
    progress bar or plots; ``options`` replace any of these."""
    fields = dict(method=method, epochs=epochs, batch_size=batch_size, lr=lr, optimizer="sgd", momentum=0.9,
                  weight_decay=1e-4, loss_reduction="mean", progress=False, plots=False, device="cpu", seed=0)
    return Config(**{**fields, **options})


def resolved_config(dataset, method, **flags):
    """The run config that ``--dataset dataset --method method`` and ``flags`` resolve to."""
    return resolve_config(argparse.Namespace(dataset=dataset, method=method, **flags))


def configured_method(cfg, train_size=640):
    """The method a run of ``cfg`` builds for audio, visual and fusion heads."""
    from engines.methods import method_from_config

    return method_from_config(cfg, HEADS, train_size=train_size)


def released_epochs(model, loader, epochs, lr, loss):
    """The released scripts' loop: SGD (``lr``, momentum 0.9, weight decay 1e-4); per epoch
    (counted from 0) train mode, then for each batch of ``loader``
    ``loss(model, inputs, labels, epoch)`` backward and a step. Returns the model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        for inputs, labels, _ in loader:
            optimizer.zero_grad()
            loss(model, inputs, labels, epoch).backward()
            optimizer.step()
    return model


# -- our steps -------------------------------------------------------------------------------------
def step_means(model, method, inputs, labels, ctx):
    """One ``train_step`` of our loop on the batch; the step's diagnostic means."""
    diagnostics = DiagnosticMeans()
    train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), diagnostics)
    return diagnostics.means(method.heads)


def one_step(model, method, inputs, labels, lr=0.0):
    """One training step (train mode, SGD at ``lr``: at 0 the gradients stay on the model and
    the weights do not move); returns the diagnostics."""
    model.train()
    ctx = StepContext(device=CPU, network_optimizer=torch.optim.SGD(model.parameters(), lr=lr), progress=False)
    return step_means(model, method, inputs, labels, ctx)


def modulation_per_step(model, method, optimizer, batches, epochs, steps, first_epoch=1):
    """``epochs`` epochs from ``first_epoch`` of ``steps`` training steps each on the next of
    ``batches`` (``start_epoch`` without data, then train mode); each step's ``modulation``
    diagnostic."""
    ctx = StepContext(device=CPU, network_optimizer=optimizer, progress=False)
    record = []
    for epoch in range(first_epoch, first_epoch + epochs):
        method.start_epoch(epoch, model, None)
        model.train()
        for _ in range(steps):
            record.append(step_means(model, method, *next(batches), ctx)["modulation"])
    return record


# -- data ------------------------------------------------------------------------------------------
def batch(seed, size=24, classes=CLASSES):
    """``INPUTS`` features per modality drawn from ``seed``; the labels 0, 1, ... in turn."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(size, INPUTS, generator=generator) for m in MODALITIES}
    return inputs, torch.arange(size) % classes


class BatchList(EpochData):
    """EpochData over fixed batches; records which split was read and what share was asked."""

    def __init__(self, train=(), val=()):
        self.train, self.val, self.reads = list(train), list(val), []

    def train_batches(self, share: float = 1.0):
        self.reads.append(("train", share))
        return iter(self.train)

    def val_batches(self):
        self.reads.append(("val", None))
        return iter(self.val)


# -- checks ----------------------------------------------------------------------------------------
def assert_refused(name, settings, fragment, heads=HEADS, **keywords):
    """Building the method ``name`` for ``heads`` with ``settings`` fails with one UserError
    whose sentence matches ``fragment``."""
    with pytest.raises(UserError, match=fragment):
        build_method(name, heads, settings, **keywords)
