"""What gradient-modulating methods (OGM-GE, AGM) log: per step, each head's discrepancy ratio
and gradient coefficient (1 for heads never modulated); per epoch, the coefficients' means."""
from __future__ import annotations

from typing import Sequence

import torch


class ModulationLog:
    def __init__(self, heads: Sequence[str], modalities: Sequence[str]):
        self.heads, self.modalities = tuple(heads), tuple(modalities)
        self._sums, self._count = torch.zeros(len(self.heads)), 0
        self._reported = {h: 1.0 for h in self.heads}

    def record(self, ratios: torch.Tensor, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """This step's diagnostics, from one ratio and one coefficient per modality."""
        ratio, k = torch.ones(len(self.heads)), torch.ones(len(self.heads))
        for i, m in enumerate(self.modalities):
            ratio[self.heads.index(m)] = float(ratios[i])
            k[self.heads.index(m)] = float(coefficients[i])
        self._sums += k
        self._count += 1
        return {"discrepancy": ratio, "modulation": k}

    def mean_coefficients(self) -> dict[str, float]:
        """Mean coefficient per head over the steps since the previous call (the trainer asks
        once per epoch); the last means again when no step was recorded since."""
        if self._count:
            self._reported = {h: float(v) for h, v in zip(self.heads, self._sums / self._count)}
            self._sums.zero_()
            self._count = 0
        return dict(self._reported)
