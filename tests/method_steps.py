"""What the cross-cutting step tests (two DDP ranks, autocast) need to know about a method,
read from its own equivalence-test module so that adding a method never edits those tests.

``tests/test_equivalence_<name>.py`` may define:

- ``STEP_SETTINGS``: settings under which the method's per-epoch behaviour (estimates,
  re-initializations, teachers, ...) happens within the tests' two short epochs;
- ``FP16_BACKOFFS``: how many times the fp16 loss scale may halve while the autocast test's
  steps find it (0 unless the method's maths amplifies gradients at small feature norms, as
  cosine logits do: GradScaler then skips those steps, which is what it is for);
- ``OTHER_SETTING_VALUES``: setting -> values other than the default that the method accepts,
  for free-text settings (tests/test_method_settings.py cannot invent a path);
- ``step_model(seed, inputs, classes)``: a model for methods that need more than a plain
  late-fusion model (``inputs`` features per modality, ``classes`` classes), with the same heads.

Every method is also handed ``start_epoch`` before its steps, with data of the rank's own.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from olmbalance.base import EpochData

CLASSES, INPUTS = 4, 6


def equivalence_module(name: str):
    module = f"tests.test_equivalence_{name}"
    return importlib.import_module(module) if importlib.util.find_spec(module) else None


def step_settings(name: str) -> dict:
    return dict(getattr(equivalence_module(name), "STEP_SETTINGS", {}))


def fp16_backoffs(name: str) -> int:
    return int(getattr(equivalence_module(name), "FP16_BACKOFFS", 0))


def step_model(name: str, default, seed: int = 0, inputs: int = INPUTS, classes: int = CLASSES):
    """``default(seed)`` unless the method's test module names a model of its own."""
    factory = getattr(equivalence_module(name), "step_model", None)
    return factory(seed, inputs=inputs, classes=classes) if factory else default(seed)


def vector_batch(seed: int, size: int = 16, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(size, INPUTS, generator=generator) * scale for m in ("audio", "visual")}
    return inputs, torch.randint(0, CLASSES, (size,), generator=generator)


class RankData(EpochData):
    """Two training batches and one validation batch of a rank's own (seeded by rank)."""

    def __init__(self, rank: int, size: int = 16, scale: float = 1.0):
        self.train = [vector_batch(100 + 10 * rank + i, size, scale) for i in range(2)]
        self.val = [vector_batch(200 + rank, size, scale)]

    def train_batches(self, share: float = 1.0):
        return iter(self.train[:max(1, round(share * len(self.train)))])

    def val_batches(self):
        return iter(self.val)
