"""The one training/evaluation loop, for OLM, its loss-ratio variant and every baseline.

``train_one_epoch`` runs one pass over the training loader (every training batch exactly once);
methods that need held-out losses (OLM's ``rate`` target) draw batches from an independently
cycled held-out iterator, forwarded without gradients and normalized like the training batch
(``engines.olm.heldout_forward``). ``evaluate`` scores a
loader with the raw logits.

The loop itself reads nothing back from the device in a step: metrics stay on the device and
the finiteness checks are recorded there; both come to the host every ``check_every`` steps
and at the end of the epoch (on a GPU each read waits for every kernel queued before it).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engines.metrics import HeadMetrics
from olmbalance import Method
from olmbalance.olm import heldout_forward
from utils import distributed
from utils.errors import UserError


# A model may return an extra training loss under this key in its output dict (the mid-fusion
# transformers' valence regression); it joins the network loss, never the OLM coefficients.
AUXILIARY_LOSS = "auxiliary_loss"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class StepContext:
    """What the loop needs besides the model and the method."""

    device: torch.device
    network_optimizer: torch.optim.Optimizer
    coefficient_optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    heldout_every: int = 1
    heldout_norm: str = "batch"  # engines.olm.heldout_forward: "batch" or "running" statistics
    loss_reduction: str = "mean"  # "sum": losses scaled to sums over the global batch (released)
    progress: bool = True
    check_every: int = 20  # steps between host reads: finiteness checks and the progress bar's loss
    step: int = 0
    skipped_samples: int = 0
    heldout_cache: dict = field(default_factory=dict)
    # (step, all finite?, value shown, what) per check made on the device since the last read
    pending_checks: list = field(default_factory=list)


def cycle(loader) -> Iterator:
    """Iterate ``loader`` forever, re-shuffling at every pass (unlike itertools.cycle)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the held-out loader is empty")


def autocast(ctx: StepContext):
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype)


def to_device(inputs, ctx: StepContext):
    """Move a (possibly nested) dict of tensors; images go channels-last when asked."""
    if isinstance(inputs, Mapping):
        return {k: to_device(v, ctx) for k, v in inputs.items()}
    if not torch.is_tensor(inputs):
        return inputs
    tensor = inputs.to(ctx.device, non_blocking=True)
    if ctx.channels_last and tensor.dim() == 4 and tensor.is_floating_point():
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def head_losses(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, heads) -> dict[str, torch.Tensor]:
    """Per-head cross-entropy in float32, a mean over the batch (what is logged and what OLM's
    statistics compare; ``loss_weight`` turns the trained losses into sums)."""
    return {h: F.cross_entropy(logits[h].float(), labels) for h in heads}


def loss_weight(ctx: StepContext, labels: torch.Tensor) -> float:
    """What the trained losses (network and coefficient) are multiplied by: 1 for batch means;
    for ``--loss-reduction sum`` the global batch size, so that per-rank means times it,
    averaged over ranks as DDP does, are the released sums over the batch. The weight decay's
    strength relative to the loss then matches the released Adam(weight_decay=2e-4) recipe."""
    if ctx.loss_reduction == "mean":
        return 1.0
    return float(labels.shape[0] * distributed.world_size())


def too_few_readable(inputs, labels, skipped: int) -> bool:
    """Nothing readable, or unreadable samples left a single one: BatchNorm cannot take batch
    statistics of one sample when its feature maps are 1x1 (a batch of one by design, at
    ``--batch-size 1``, is left to the model)."""
    return inputs is None or (skipped > 0 and labels.shape[0] < 2)


def next_readable(heldout_iter, ctx: StepContext, attempts: int = 100):
    """The next held-out batch with at least one readable sample, or two where unreadable
    samples shrank it (skipped samples are counted)."""
    for _ in range(attempts):
        inputs, labels, skipped = next(heldout_iter)
        ctx.skipped_samples += skipped
        if not too_few_readable(inputs, labels, skipped):
            return inputs, labels, 0
        ctx.skipped_samples += 0 if labels is None else labels.shape[0]
    raise UserError(f"{attempts} held-out (validation) batches in a row had no readable sample; "
                    "check the validation split's files")


def heldout_losses(model, method: Method, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Per-head CE of the modulated logits on one held-out batch, without gradients.

    With ``ctx.heldout_norm == "batch"`` (default) the losses are measured like the training
    losses: normalization uses the held-out batch's own statistics; with ``"running"`` the
    model runs in eval mode. Either way running statistics, ``num_batches_tracked`` and the
    training flags end as they were, and dropout is off. Under DDP the bare module runs (a
    no-grad forward needs no gradient sync), then the losses are averaged over ranks."""
    inputs, labels, _ = batch
    model = distributed.unwrap(model)
    with heldout_forward(model, ctx.heldout_norm), torch.no_grad(), autocast(ctx):
        logits = model(to_device(inputs, ctx))
        scaled = method.scale(logits)
        losses = head_losses(scaled, labels.to(ctx.device), method.heads)
    stacked = distributed.all_reduce_mean(torch.stack([losses[h].detach() for h in method.heads]))
    return dict(zip(method.heads, stacked))


class DiagnosticMeans:
    """Epoch means of the per-step method diagnostics (ratios, targets, G, C, ...)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        # Sums stay on the values' device: a per-step copy to the host would synchronize a GPU.
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] += 1

    def means(self, heads) -> dict:
        result = {}
        for key, total in self.sums.items():
            mean = total.cpu() / self.counts[key]
            result[key] = dict(zip(heads, mean.tolist())) if mean.dim() == 1 else float(mean)
        return result


def record_check(ctx: StepContext, finite: torch.Tensor, value: torch.Tensor, what: str) -> None:
    """Keep a finiteness check on the device; ``read_checks`` raises for the first that failed."""
    ctx.pending_checks.append((ctx.step, finite, value, what))


def read_checks(ctx: StepContext) -> None:
    """One read from the device for every check recorded since the last read. Every rank
    checks the same all-reduced values, so all ranks stop together at the same step."""
    if not ctx.pending_checks:
        return
    checks, ctx.pending_checks = ctx.pending_checks, []
    finite = torch.stack([c[1] for c in checks]).cpu().tolist()
    if all(finite):
        return
    step, _, value, what = checks[finite.index(False)]
    detail = f"the training loss became {float(value)}" if what == "loss" else \
        "the OLM coefficient gradient became non-finite"
    raise NonFiniteLoss(f"{detail} at step {step}")


def train_step(model, method: Method, batch, heldout_iter, ctx: StepContext, metrics: HeadMetrics,
               diagnostics: DiagnosticMeans) -> None:
    inputs, labels, skipped = batch
    ctx.skipped_samples += skipped
    # Under DDP every rank must run the same steps, so a batch with nothing readable on one
    # rank skips that step everywhere.
    if distributed.any_rank(too_few_readable(inputs, labels, skipped)):
        ctx.skipped_samples += 0 if labels is None else labels.shape[0]
        return
    inputs, labels = to_device(inputs, ctx), labels.to(ctx.device, non_blocking=True)
    for substep in range(method.substeps()):  # 1 but for MLA: one optimizer step per modality
        step_logits, step_losses = optimizer_step(model, method, inputs, labels, heldout_iter, ctx, diagnostics)
        if substep == 0:  # what is logged: the batch as the model met it, as for every method
            logits, losses = step_logits, step_losses
    ctx.step += 1
    # Logged like val/test, on the raw logits; the loss the method trained on sits beside it.
    with torch.no_grad():
        metrics.update(logits, labels, head_losses(logits, labels, method.heads), modulated=losses)


def optimizer_step(model, method: Method, inputs, labels, heldout_iter, ctx: StepContext,
                   diagnostics: DiagnosticMeans):
    """One forward, backward and optimizer step on a batch already on the device; returns the
    step's logits and the per-head losses the method trained on."""
    optimizers = [o for o in (ctx.network_optimizer, ctx.coefficient_optimizer) if o is not None]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)

    with autocast(ctx):
        logits = method.forward_train(model, inputs, labels)
    losses = head_losses(method.scale(logits), labels, method.heads)
    network_loss = method.network_loss(losses)
    if AUXILIARY_LOSS in logits:  # e.g. the transformers' valence MSE, trained beside the heads
        network_loss = network_loss + logits[AUXILIARY_LOSS].float()
    weight = loss_weight(ctx, labels)  # 1 for batch means; the global batch size for released sums
    loss = network_loss * weight
    # One reduction gives OLM identical statistics on every rank and lets all ranks stop
    # together when any of them sees a non-finite loss.
    reduced = distributed.all_reduce_mean(torch.stack([*(losses[h].detach() for h in method.heads),
                                                       loss.detach().float()]))
    record_check(ctx, torch.isfinite(reduced).all(), reduced[-1], "loss")
    train_reduced = dict(zip(method.heads, reduced[:-1]))
    coefficients = method.coefficient_parameters()

    method.backward(model, loss, {h: losses[h] * weight for h in losses},
                    lambda tensor: ctx.scaler.scale(tensor) if ctx.scaler else tensor)
    if ctx.scaler:
        # Unscale now: gradient-modulating methods read true gradients, and the coefficient
        # loss below adds an unscaled gradient to w. The scaler drives the network optimizer
        # only; w's share of the scaled loss is unscaled here by hand.
        ctx.scaler.unscale_(ctx.network_optimizer)
        inverse_scale = 1.0 / ctx.scaler.get_scale()
        for parameter in coefficients:
            if parameter.grad is not None:
                parameter.grad.mul_(inverse_scale)
    method.after_backward(distributed.unwrap(model), logits, labels)

    if coefficients:
        heldout = None
        if method.needs_heldout:
            if ctx.step % ctx.heldout_every == 0 or not ctx.heldout_cache or method.heldout_due():
                ctx.heldout_cache = heldout_losses(model, method, next_readable(heldout_iter, ctx), ctx)
            heldout = ctx.heldout_cache
        coefficient_loss = method.coefficient_loss(logits, train_reduced, heldout)
        if coefficient_loss is not None:
            (coefficient_loss * weight).backward()
        for parameter in coefficients:
            if parameter.grad is not None:  # DDP does not see w: average it here, as DDP would
                parameter.grad.copy_(distributed.all_reduce_mean(parameter.grad))
    diagnostics.add(method.diagnostics())  # OLM's ratios and gains, OGM-GE's modulation

    step_coefficients = ctx.coefficient_optimizer is not None
    if ctx.scaler:
        scale_before = ctx.scaler.get_scale()
        ctx.scaler.step(ctx.network_optimizer)
        ctx.scaler.update()
        # The scale drops exactly when the scaler found inf/NaN gradients and skipped the
        # network step; w skips it too (the decision is the same on every rank).
        step_coefficients = step_coefficients and ctx.scaler.get_scale() >= scale_before
    else:
        ctx.network_optimizer.step()
    if step_coefficients:
        grads = [p.grad.detach().reshape(-1) for p in coefficients if p.grad is not None]
        if grads:
            gradient = torch.cat(grads)
            record_check(ctx, torch.isfinite(gradient).all(), gradient.sum(), "coefficient gradient")
        ctx.coefficient_optimizer.step()
    return logits, losses


def train_one_epoch(model, method: Method, loader, heldout_iter, ctx: StepContext, epoch: int):
    model.train()
    metrics = HeadMetrics(method.heads)
    diagnostics = DiagnosticMeans()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True,
               disable=not (ctx.progress and distributed.is_main()))
    for batch in bar:
        try:
            train_step(model, method, batch, heldout_iter, ctx, metrics, diagnostics)
        except Exception:
            read_checks(ctx)  # a loss that turned non-finite earlier is the cause to report
            raise
        if ctx.step % max(1, ctx.check_every) == 0:  # the logging interval: the only host reads
            read_checks(ctx)
            if metrics.count and not bar.disable:
                bar.set_postfix(loss=f"{sum(metrics.loss_sums.values()) / metrics.count:.3f}")
    read_checks(ctx)
    return metrics, diagnostics.means(method.heads)


@torch.no_grad()
def evaluate(model, loader, heads, ctx: StepContext, desc: str = "eval", method: Method | None = None) -> HeadMetrics:
    """Raw-logit metrics of ``model`` on ``loader`` (eval mode); ``method.forward_eval`` makes
    the logits when given (MLA's fused prediction). Under DDP the bare module runs: ranks may
    hold different numbers of batches, so no collective may happen in this loop."""
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    metrics = HeadMetrics(heads)
    for inputs, labels, skipped in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                        disable=not (ctx.progress and distributed.is_main())):
        ctx.skipped_samples += skipped
        if inputs is None:
            continue
        labels = labels.to(ctx.device, non_blocking=True)
        with autocast(ctx):
            inputs = to_device(inputs, ctx)
            logits = method.forward_eval(model, inputs) if method is not None else model(inputs)
        metrics.update(logits, labels, head_losses(logits, labels, heads))
    model.train(was_training)
    return metrics
