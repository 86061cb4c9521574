"""Greedy: balanced multimodal learning by re-balancing steps (Wu, Jastrzebski, Cho, Geras,
"Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural
Networks", ICML 2022), as its authors ran it.

Followed: github nyukat/greedy_multimodal_learning, ``src/balanced_mmtm.py``
(``MMTM_mitigate.forward``), ``src/model.py`` (``MMTM_MVCNN.forward``), ``src/callbacks.py``
(``Bias_Mitigation_Strong``: ``compute_BDR``, ``on_backward_end``, ``on_epoch_begin``),
``src/framework.py`` (``Model_.train_loop``), ``train.py`` (``blend_loss``, ``acc``) and
``configs/training_guided.gin``. GeWu-Lab BalanceBenchmark's ``balancemm/trainer/
Greedy_trainer.py`` and ``BaseClassifierGreedyModel``/``MMTM`` in ``balancemm/models/
avclassify_model.py`` were read too (differences below).

The model (``models/mmtm.py``, attached at ``setup`` before the optimizer is built): a
multimodal transfer module after each of the last ``stages`` stages of both encoders (released:
after ResNet18's layer2, layer3 and layer4). Each modality's head is its own unimodal head;
the prediction is the mean of the two unimodal logits (``(x_0 + x_1) / 2``), which is what
this method reports as the "fusion" head; the loss is the sum of the two unimodal heads'
batch-mean cross-entropies (``blend_loss``). The model's own fusion head is not trained.

Per step (``on_backward_end`` runs after the backward pass and before ``optimizer.step()``):

- the forward runs in the mode the previous step decided: plainly, or re-balancing modality
  ``c``, whose MMTM scales are replaced by their running means over the run's steps (this
  batch's included), so its branch learns without the other modality's help;
- every MMTM folds each modality's batch-mean scale into its running mean (steps ``n``:
  ``(s + r n) / (n + 1)``);
- conditional learning speeds: with ``|w|^2`` and ``|g|^2`` summed over a parameter group,
  the *bypass* group of modality m is its MMTM excitation layers plus every squeeze layer
  (shared), the *main* group its encoder plus its unimodal head; ``M_bypass_m`` and
  ``M_main_m`` accumulate ``|g|^2 / |w|^2`` over the steps where they are computed, from the
  run's first step; ``BDR_m = log10(M_bypass_m / M_main_m)``, ``d = BDR_0 - BDR_1``;
- before epoch ``starting_epoch`` (1-based; released 2, so one warm-up epoch) only the speeds
  accumulate and every step is plain; from it on, a plain step with ``|d| > alpha`` starts a
  window of ``window_size`` re-balancing steps (the next ones) for modality 0 when ``d > 0``,
  modality 1 when ``d < 0``; speeds are not computed during a window; the step after it is
  plain and decides again. The state carries across epochs, as released.

Differences, and why:

- Encoders: any whose ``stages()`` describe them; the MMTM blocks pair the encoders' last
  ``stages`` stages counted from the end (ResNet18: layer2-4, as released; the small CNN of
  the embedded set: audio blocks 2-4 with visual blocks 1-3, whose widths match). Video clips
  are folded into the batch by our visual encoders: an MMTM squeezes a clip's frames and
  positions together and applies the clip's scale to each frame (BalanceBenchmark's handling;
  the released inputs are single images).
- The released running mean of the second modality's scale is fed the *first* modality's
  scale (``running_avg_weight_skeleton`` from ``vis_out``, and sized like the first): a defect;
  each modality's own scale is averaged here, as BalanceBenchmark does.
- The released MMTMs update their running means in every forward, validation and test
  batches included, and evaluate in whatever re-balancing mode the last training step left;
  here only this method's training steps move the running means (test data never shapes
  training) and evaluation always runs plainly.
- Under DDP the batch-mean scales are averaged over ranks before entering the running means
  (the released code runs one process), so every rank re-balances with the same constants;
  the gradients the speeds read are already averaged by DDP.
- A step whose gradients are not finite (an fp16 step the loss scaler skips) or whose group
  weights are all zero adds no speeds and decides nothing; a parameter without a gradient
  counts as a zero gradient (released torch 1.x gave zero tensors). A re-balanced modality's
  excitation layers therefore get no gradient, and the optimizer skips them, where the
  released torch applied momentum and weight decay to their zero gradients; with the
  released SGD recipe (no momentum, no weight decay) both do nothing.
- ``--fusion`` plays no part: the released model has no fusion head, and neither its loss nor
  its prediction uses one (here the fusion head's parameters are left untrained).
- The released recipe also lowers the rate on plateaus of the training loss
  (``ReduceLROnPlateau(factor 0.3, patience 10)``) and stops after 5 epochs at 100% training
  accuracy; the loop has neither, so ``--recipe authors`` keeps the rate constant.
- BalanceBenchmark's version cannot run as released: its ``MMTM.forward`` empties
  ``running_avg_weight`` and then reads it (KeyError), and reshapes the visual maps with a
  hard-coded batch of 64; it also puts MMTMs after all four ResNet layers, trains the concat
  fusion head's loss only, has no warm-up epoch and uses ``alpha=0.001``. The authors' code is
  followed instead (``--greedy-stages 4 --greedy-starting-epoch 1 --greedy-alpha 0.001`` come
  closer to it).
- Two modalities only, as released (the rule compares two speeds by the sign of a difference).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from olmbalance import distributed
from olmbalance.base import Method
from olmbalance.errors import UserError
from olmbalance.model_access import add_mmtm
from olmbalance.registry import RunContext, Setting, register_method


def squared_norms(tensors: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Sum of the squared entries (float32 per tensor, float64 in total); None counts as zero."""
    present = [t.detach().float().square().sum() for t in tensors if t is not None]
    return torch.stack(present).double().sum() if present else torch.zeros((), dtype=torch.float64, device=like.device)


class Greedy(Method):
    name = "greedy"
    # The fusion head is never trained, and a re-balanced modality's excitation layers get no gradient.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, alpha: float = 0.01,
                 window_size: int = 5, starting_epoch: int = 2, stages: int = 3, ratio: float = 4.0):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) != 2:
            raise UserError(f"--method greedy takes exactly two modalities and a 'fusion' head, as its authors' "
                            f"method does; this model has {', '.join(self.heads)}")
        if alpha < 0:
            raise UserError(f"--greedy-alpha must be at least 0, got {alpha}")
        if window_size < 1:
            raise UserError(f"--greedy-window-size must be at least 1, got {window_size}")
        if starting_epoch < 1:
            raise UserError(f"--greedy-starting-epoch counts epochs from 1, got {starting_epoch}")
        if stages < 1:
            raise UserError(f"--greedy-stages must be at least 1, got {stages}")
        if ratio <= 0:
            raise UserError(f"--greedy-ratio must be positive, got {ratio}")
        self.alpha, self.window_size, self.starting_epoch = float(alpha), int(window_size), int(starting_epoch)
        self.stages, self.ratio = int(stages), float(ratio)
        # Host state, checkpointed as extra state (identical on every rank: it is computed from
        # DDP-averaged gradients): the epoch, the accumulated speeds, the re-balancing window.
        self.epoch = 0
        self.bypass_speed = [0.0, 0.0]
        self.main_speed = [0.0, 0.0]
        self.curating = False
        self.caring = 0
        self.curation_step = 0
        self.d_bdr = 0.0
        self.step_frozen: int | None = None  # the modality the last forward re-balanced

    def setup(self, model) -> None:
        net = distributed.unwrap(model)
        exchange = add_mmtm(model, self.name, self.stages, self.ratio)
        if tuple(getattr(net, "modalities", ())) != self.modalities or not hasattr(net, "unimodal_heads"):
            raise UserError("--method greedy needs a late-fusion model with one unimodal head per modality")
        self.exchange = [exchange]  # a list: the model's modules are not the method's own
        trainable = lambda module: [p for p in module.parameters() if p.requires_grad]
        self.groups = {
            "shared": [p for p in exchange.shared_parameters() if p.requires_grad],
            "bypass": [[p for p in exchange.bypass_parameters(i) if p.requires_grad] for i in range(2)],
            "main": [trainable(net.encoders[m]) + trainable(net.unimodal_heads[m]) for m in self.modalities],
        }

    def trained_heads(self) -> tuple[str, ...]:
        return self.modalities

    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch)

    def mean_prediction(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The released prediction: the mean of the unimodal logits (float32)."""
        return sum(logits[m].detach().float() for m in self.modalities) / len(self.modalities)

    def forward_train(self, model, inputs, labels):
        exchange = self.exchange[0]
        self.step_frozen = self.caring if self.curating else None
        exchange.frozen, exchange.track = self.step_frozen, True
        try:
            logits = model(inputs)
        finally:  # any other forward runs plainly and leaves the running means alone
            exchange.frozen, exchange.track = None, False
        logits["fusion"] = self.mean_prediction(logits)
        return logits

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        logits["fusion"] = self.mean_prediction(logits)
        return logits

    def speeds(self) -> tuple[list[float], list[float]] | None:
        """This step's ``|g|^2 / |w|^2`` of the bypass and main groups per modality, or None
        when they are not usable (gradients not finite, a group without weight)."""
        groups, like = self.groups, self.groups["main"][0][0]
        sums = [squared_norms(groups["shared"], like), squared_norms([p.grad for p in groups["shared"]], like)]
        for kind in ("bypass", "main"):
            for params in groups[kind]:
                sums += [squared_norms(params, like), squared_norms([p.grad for p in params], like)]
        values = torch.stack(sums).tolist()  # the step's one read from the device
        if not all(math.isfinite(v) for v in values):
            return None
        shared_w, shared_g = values[0], values[1]
        bypass_w = [values[2] + shared_w, values[4] + shared_w]
        bypass_g = [values[3] + shared_g, values[5] + shared_g]
        main_w, main_g = [values[6], values[8]], [values[7], values[9]]
        if min(bypass_w + main_w) <= 0:
            return None
        return [g / w for g, w in zip(bypass_g, bypass_w)], [g / w for g, w in zip(main_g, main_w)]

    def compute_bdr(self) -> float | None:
        """The released ``compute_BDR``: accumulate the speeds, return ``BDR_0 - BDR_1``."""
        step = self.speeds()
        if step is None:
            return None
        for i in range(2):
            self.bypass_speed[i] += step[0][i]
            self.main_speed[i] += step[1][i]
        if min(self.bypass_speed + self.main_speed) <= 0:  # no gradient has reached a group yet
            return None
        bdr = [math.log10(self.bypass_speed[i] / self.main_speed[i]) for i in range(2)]
        self.d_bdr = bdr[0] - bdr[1]
        return self.d_bdr

    def after_backward(self, model, logits, labels) -> None:
        """The released ``on_backward_end``: decides how the next step's forward runs."""
        if self.epoch < self.starting_epoch:
            self.compute_bdr()
            self.curating, self.caring = False, 0
        elif not self.curating:
            d = self.compute_bdr()
            if d is not None and abs(d) > self.alpha:
                self.curating, self.curation_step = True, 0
                self.caring = 1 if d < 0 else 0
            else:
                self.curating, self.caring = False, 0
        else:
            self.curation_step += 1
            if self.curation_step == self.window_size:
                self.curating = False

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """``rebalanced``: per head, 1 where the step re-balanced that modality (its epoch mean
        is the share of such steps); ``d_bdr``: the last ``BDR_0 - BDR_1`` computed."""
        rebalanced = torch.zeros(len(self.heads))
        if self.step_frozen is not None:
            rebalanced[self.heads.index(self.modalities[self.step_frozen])] = 1.0
        return {"rebalanced": rebalanced, "d_bdr": torch.tensor(self.d_bdr)}

    def get_extra_state(self):
        return {"epoch": self.epoch, "bypass_speed": list(self.bypass_speed), "main_speed": list(self.main_speed),
                "curating": self.curating, "caring": self.caring, "curation_step": self.curation_step,
                "d_bdr": self.d_bdr}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])
        self.bypass_speed = [float(v) for v in state["bypass_speed"]]
        self.main_speed = [float(v) for v in state["main_speed"]]
        self.curating, self.caring = bool(state["curating"]), int(state["caring"])
        self.curation_step, self.d_bdr = int(state["curation_step"]), float(state["d_bdr"])


# configs/training_guided.gin and train.py: SGD lr 0.1, no momentum, no weight decay, batch 8,
# 300 epochs (ReduceLROnPlateau and completed-stopping aside), blend_loss = sum of batch-mean CEs.
_GREEDY_AUTHORS = dict(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, lr_step=0, loss_reduction="mean",
                       batch_size=8, epochs=300)


@register_method(
    "greedy", prefix="greedy",
    settings=(Setting("alpha", float, 0.01, "a re-balancing window starts when |BDR_0 - BDR_1| exceeds this "
                                            "(released epsilon 0.01; BalanceBenchmark 0.001)"),
              Setting("window_size", int, 5, "re-balancing steps per window (released 5)"),
              Setting("starting_epoch", int, 2, "first epoch (from 1) that may re-balance; before it the speeds "
                                                "only accumulate (released 2)"),
              Setting("stages", int, 3, "MMTM blocks after each encoder's last N stages (released 3: ResNet18 "
                                        "layer2-4; BalanceBenchmark 4)"),
              Setting("ratio", float, 4.0, "MMTM squeeze width 2 (C_0 + C_1) / ratio (released 4)")),
    recipes={"authors": {"*": _GREEDY_AUTHORS}},
    summary="Greedy, re-balancing steps from conditional learning speeds through MMTM (Wu et al., ICML 2022)")
def greedy(heads, context, alpha, window_size, starting_epoch, stages, ratio):
    return Greedy(heads, context, alpha=alpha, window_size=window_size, starting_epoch=starting_epoch,
                  stages=stages, ratio=ratio)
