"""Audio-visual late-fusion classifier: one encoder and one linear head per modality, plus a
fusion head. ``forward`` returns ``{"audio": ..., "visual": ..., "fusion": ...}``."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from models.fusion import build_fusion
from models.resnet import FEATURE_DIM, AudioEncoder, VisualEncoder

ENCODERS = {"audio": AudioEncoder, "visual": VisualEncoder}


class LateFusionClassifier(nn.Module):
    """Encoders per modality, a linear unimodal head each, and a fusion head.

    ``detach_unimodal_heads``: when True the unimodal heads read detached features, so they
    are read-outs that measure what each encoder learned without training it (the
    ``fusion_only`` baseline sets this).

    ``keep_features``: when True, ``last_features`` holds the last forward's encoder features
    (modality -> (B, D), with their graph) for methods that need them.
    """

    def __init__(self, num_classes: int, modalities: Sequence[str] = ("audio", "visual"),
                 fusion: str = "bilinear", encoders: Mapping[str, nn.Module] | None = None,
                 feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.modalities = tuple(modalities)
        if encoders is None:
            unknown = [m for m in self.modalities if m not in ENCODERS]
            if unknown:
                raise ValueError(f"no default encoder for modalities {unknown}")
            encoders = {m: ENCODERS[m]() for m in self.modalities}
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(feature_dim, num_classes)
                                             for m in self.modalities})
        self.fusion = build_fusion(fusion, [feature_dim] * len(self.modalities), num_classes)
        self.heads = (*self.modalities, "fusion")
        self.detach_unimodal_heads = False
        # Methods that read the encoders' features (PMR's prototypes, AGM's masked fusion,
        # MLA's shared head) set this; off by default so the model holds no graph between steps.
        self.keep_features = False
        self.last_features: dict[str, torch.Tensor] = {}
        # Multimodal transfer modules between the encoders' stages (models/mmtm.py), attached by
        # add_mmtm for Greedy only; None keeps the encoders apart (and the state dict as it was).
        self.mmtm = None

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every modality's encoder features (B, D). With MMTM blocks attached (Greedy,
        models/mmtm.py) the encoders run stage by stage and exchange through them, unless they
        are identities (engines.imbalance swaps those in to run the heads on given features)."""
        if self.mmtm is None or all(isinstance(self.encoders[m], nn.Identity) for m in self.modalities):
            return {m: self.encoders[m](inputs[m]) for m in self.modalities}
        return self.mmtm(self.encoders, inputs)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.encode(inputs)
        if self.keep_features:
            self.last_features = features
        logits = {}
        for m in self.modalities:
            f = features[m].detach() if self.detach_unimodal_heads else features[m]
            logits[m] = self.unimodal_heads[m](f)
        logits["fusion"] = self.fusion([features[m] for m in self.modalities])
        return logits

    def add_mmtm(self, count: int = 3, ratio: float = 4) -> nn.Module:
        """Attach MMTM blocks after each encoder's last ``count`` stages (Greedy's model; the
        encoders must expose ``stages()``, models/mmtm.py) and return them; ValueError when an
        encoder cannot take them. Once attached they stay: a second call returns them."""
        from models.mmtm import MMTMExchange

        if self.mmtm is None:
            self.mmtm = MMTMExchange.between(self.encoders, self.modalities, count, ratio)
        return self.mmtm
