"""Network optimizers by name, built the same way by the training loop and by methods that
train copies of the model (G-Blending's estimates, the uni-modal teachers); and the one
recipe BalanceBenchmark runs every method with, for methods whose authors released none."""
from __future__ import annotations

import torch

from olmbalance.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")

# BalanceBenchmark's configs/global_config.yaml: AdamW (weight decay 0.01), lr 1e-3 (its
# base_lr, used as is), StepLR(10, 0.1), batch 32 (eff_batch_size), 30 epochs, batch-mean CE.
BALANCEBENCHMARK_RUN = dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, lr_step=10, lr_gamma=0.1,
                            loss_reduction="mean", batch_size=32, epochs=30)


def make_optimizer(parameters, name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam and SGD with coupled weight decay (the released OLM and OGM-GE recipes), AdamW with
    decoupled decay (BalanceBenchmark's); ``momentum`` is SGD's."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise UserError(f"--optimizer {name!r} is not one of: {', '.join(OPTIMIZERS)}")


def run_optimizer(parameters, context) -> torch.optim.Optimizer:
    """A fresh optimizer built like the run's network optimizer (``RunContext``): for methods
    that train copies of the model the way the run trains it."""
    return make_optimizer(parameters, context.optimizer, context.lr, context.momentum, context.weight_decay)
