"""OPM: On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced
Multimodal Learning", TPAMI 2024, the journal version of OGM-GE), on top of ``fusion_only``.

Follows the authors' released code, github GeWu-Lab/BML_TPAMI2024: ``code/main.py`` ``train``
(the warm-up, ``--use_adam_drop``, the fusion loss alone), ``code/models/Classifier.py``
(``Classifier.forward``: the per-modality scores; ``calcu_q``; ``Modality_drop.execute_drop``;
``custom_autograd``), with ``code/config.py`` and ``code/scripts/train_opm.sh`` for the
settings. BalanceBenchmark's ``balancemm/trainer/OPM_trainer.py`` (``Modality_drop``,
``OPMTrainer.training_step``) was read too; where it differs (below) the released code is
followed.

Per step, once the warm-up is over (released: while the 0-based epoch is <= 5 nothing is
dropped, ``warmup_epochs=6``):

- score ``s_m``: the batch sum of the true class's softmax probability under modality m's share
  of the fusion logits (the concat head's weight block times m's features plus half the bias:
  the released ``performance_1/2``); the same score and ratio as OGM-GE
  (``ogm_ge.share_logits``, ``ogm_ge.discrepancy_ratios``: ``rho_m = s_m / s_other``);
- ``r_m = tanh(relu(rho_m - 1))``; drop probability ``q_m = q_base (1 + alpha r_m)`` where
  ``r_m > 0``, else 0, clipped to [0, 1] (``calcu_q``; ``alpha`` is the released ``--lam``);
  only the dominant modality gets ``q > 0``;
- with probability ``p_exe`` the step drops (``execute_drop``): each sample keeps modality m's
  features with probability ``1 - q_m`` (one Bernoulli draw per sample and modality), the kept
  features are divided by ``1 - theta`` with ``theta = sum_m D_m q_m / sum_m D_m`` (D_m the
  feature widths), and the fusion head sees the result (``model_access.fuse``); otherwise the
  step is the plain one. The loss is the fusion head's cross-entropy alone, as released.

The released code also drops the samples whose every modality was dropped; that cannot happen:
the least-scoring modality has ``rho <= 1``, so ``q = 0``, and every sample keeps it.

Where this differs from the released code, and why:

- ``custom_autograd.backward`` returns ``theta`` itself as the gradient of ``theta`` (it means
  None: the division by ``1 - theta`` is a constant rescaling, as in dropout). Since ``theta``
  depends on the scores, and the scores on the features, that line sends an extra gradient
  ``theta * d(theta)/d(features)`` into the encoders (it lowers the dominant modality's score)
  on every executed drop. Treated here as the defect it is: ``theta`` is a constant.
- With more than two modalities ``rho_m`` is over the mean score of the others (OGM-GE's
  generalization here); the released code has two modalities, BalanceBenchmark divides by
  the sum of the others' scores.
- Scores on heads without per-modality shares (``bilinear``, ``film``, ``gated``,
  ``attention``) come from the detached linear read-out heads, as for OGM-GE here.
- The draws come from a generator seeded with the run's seed and saved in checkpoints (the
  released code: numpy's and torch's global streams): per executed step one uniform draw
  decides whether to drop, then one draw seeds the step's sample masks. The decisions are
  identical on every DDP rank; the masks are the rank's own (the seed plus the rank), so that
  the samples of the global batch are dropped independently, as in one process.
- Under DDP the scores are averaged over ranks (the ratio is unchanged by the scale).
- The epoch is the loop's (``start_epoch``, counted from 1; the warm-up covers epochs
  1..``warmup_epochs``).

BalanceBenchmark's trainer differs from the released code: no warm-up (and its
``modulation_starts..ends`` window of 0..80, outside which its step returns no loss),
``q_base`` 0.4 (its config; the released run uses 0.5, ``train_opm.sh`` and the argparse
default), ``1 - theta + 1e-5``, and a ``theta`` that is differentiated through the scores.

The authors' recipe (``--recipe authors``, ``config.py``): AdamW with learning rate 5e-5 and
weight decay 0.01, StepLR(40, 0.1), batch 32, 100 epochs, batch-mean CE.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import fuse, keep_features
from olmbalance.modulation_log import ModulationLog
from olmbalance.ogm_ge import discrepancy_ratios, share_logits
from olmbalance.registry import RunContext, Setting, register_method

OPM_ALPHA = 0.5  # released --lam (train_opm.sh); BalanceBenchmark's alpha
OPM_P_EXE = 0.7
OPM_Q_BASE = 0.5  # released argparse default and train_opm.sh (config.py and BalanceBenchmark: 0.4)
OPM_WARMUP_EPOCHS = 6  # released: warm_up while the 0-based epoch is <= 5
MASK_SEEDS = 2 ** 62


def drop_probabilities(ratios: torch.Tensor, q_base: float, alpha: float) -> torch.Tensor:
    """The released ``calcu_q``: ``q_base (1 + alpha tanh(relu(rho - 1)))`` where that tanh is
    positive (the dominant modality), 0 elsewhere, clipped to [0, 1]."""
    r = torch.tanh(torch.relu(ratios - 1))
    q = torch.where(r > 0, q_base * (1 + alpha * r), torch.zeros_like(r))
    return q.clamp(0.0, 1.0)


class OnTheFlyPredictionModulation(FusionOnly):
    """OPM as its authors released it; see the module docstring."""

    name = "opm"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, alpha: float = OPM_ALPHA,
                 p_exe: float = OPM_P_EXE, q_base: float = OPM_Q_BASE, warmup_epochs: int = OPM_WARMUP_EPOCHS):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method opm needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise UserError(f"--opm-alpha must be a number >= 0, got {alpha!r}")
        for flag, value in (("--opm-p-exe", p_exe), ("--opm-q-base", q_base)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} is a probability, so it must lie in [0, 1]; got {value!r}")
        if warmup_epochs < 0:
            raise UserError(f"--opm-warmup-epochs must be >= 0, got {warmup_epochs}")
        self.alpha, self.p_exe, self.q_base = float(alpha), float(p_exe), float(q_base)
        self.warmup_epochs = int(warmup_epochs)
        self.epoch = 1  # the loop's epoch (1-based), from start_epoch
        seed = self.context.seed if self.context.seed is not None else torch.initial_seed()
        # Host generators: a step's decision needs no read from the device.
        self.generator = torch.Generator().manual_seed(int(seed))
        self.mask_generator = torch.Generator()
        self.last: dict[str, torch.Tensor] = {}
        self.log = ModulationLog(self.heads, self.modalities)

    def setup(self, model) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if set(net.modalities) != set(self.modalities):
            raise UserError(f"--method opm: the model's modalities {net.modalities} do not match its heads {self.heads}")

    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch)

    def dropping(self) -> bool:
        return self.epoch > self.warmup_epochs

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        net = distributed.unwrap(model)
        features = net.last_features
        shares = share_logits(net, [features[m] for m in net.modalities], self.modalities)
        ratios = discrepancy_ratios(shares if shares is not None else logits, labels, self.modalities)
        q = drop_probabilities(ratios, self.q_base, self.alpha)
        keep = torch.ones_like(q)
        # The released order of draws: whether to drop, then (only then) the masks.
        if self.dropping() and float(torch.rand((), generator=self.generator)) >= 1 - self.p_exe:
            seed = int(torch.randint(0, MASK_SEEDS, (), generator=self.generator))
            logits["fusion"] = fuse(model, self.dropped(features, q, seed))
            keep = 1 - q
        net.last_features = {}  # nothing of this step's graph is held past it
        self.last = self.log.record(ratios, keep)
        return logits

    def dropped(self, features, q: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Each sample keeps modality m's features with probability 1 - q_m; kept features are
        divided by 1 - theta (``execute_drop`` with ``custom_autograd``, theta a constant)."""
        rank = dist.get_rank() if distributed.is_distributed() else 0
        self.mask_generator.manual_seed((seed + rank) % MASK_SEEDS)
        batch = features[self.modalities[0]].shape[0]
        uniform = torch.rand((len(self.modalities), batch), generator=self.mask_generator).to(q.device)
        kept = uniform < (1 - q).unsqueeze(1)  # Bernoulli(1 - q_m) per sample
        widths = torch.tensor([features[m].shape[1] for m in self.modalities], dtype=q.dtype, device=q.device)
        theta = (widths * q).sum() / widths.sum()
        result = {}
        for i, m in enumerate(self.modalities):
            f = features[m]
            result[m] = f * kept[i].unsqueeze(1).to(f.dtype) / (1 - theta).to(f.dtype)
        return result

    # -- what gets logged and checkpointed -------------------------------------------------------
    def coefficients(self) -> dict[str, float]:
        """Mean share of samples whose features each head's modality keeps, per step, since the
        previous call (once per epoch): 1 - q on steps that drop, 1 otherwise."""
        return self.log.mean_coefficients()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])


@register_method(
    "opm", prefix="opm",
    settings=(Setting("alpha", float, OPM_ALPHA,
                      "growth lambda of the dominant modality's drop probability with the discrepancy (released --lam)"),
              Setting("p_exe", float, OPM_P_EXE, "probability that a step drops features at all (released --p_exe)"),
              Setting("q_base", float, OPM_Q_BASE,
                      "base drop probability of the dominant modality (released 0.5; BalanceBenchmark 0.4)"),
              Setting("warmup_epochs", int, OPM_WARMUP_EPOCHS,
                      "first epochs trained without dropping (released: epochs 0-5, i.e. 6)")),
    # The embedded sets' 10-epoch protocol: the authors' 6 warm-up epochs of 100 would leave 4 of
    # 10 modulated; one warm-up epoch keeps about their share.
    recipes={"authors": {"*": dict(optimizer="adamw", lr=5e-5, weight_decay=0.01, lr_step=40, lr_gamma=0.1,
                                   loss_reduction="mean", batch_size=32, epochs=100)},
             "default": {"AVDigits": dict(opm_warmup_epochs=1), "AVDigitsImbalanced": dict(opm_warmup_epochs=1)}},
    summary="OPM, on-the-fly prediction modulation: the dominant modality's features dropped (Wei et al., TPAMI 2024)")
def opm(heads, context, alpha, p_exe, q_base, warmup_epochs):
    return OnTheFlyPredictionModulation(heads, context, alpha=alpha, p_exe=p_exe, q_base=q_base,
                                        warmup_epochs=warmup_epochs)
