"""Which encoders a late-fusion model gets (``--encoder``): the released ResNet18 or a light CNN."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from models.resnet import FEATURE_DIM
from models.small_cnn import SMALL_FEATURE_DIM, SmallAudioEncoder, SmallVisualEncoder

ENCODER_FAMILIES = ("resnet18", "small_cnn")


def build_encoders(family: str, modalities: Sequence[str]) -> tuple[dict[str, nn.Module] | None, int]:
    """(encoders per modality, feature width); ``None`` lets LateFusionClassifier build ResNet18s."""
    if family == "resnet18":
        return None, FEATURE_DIM
    if family == "small_cnn":
        classes = {"audio": SmallAudioEncoder, "visual": SmallVisualEncoder}
        unknown = [m for m in modalities if m not in classes]
        if unknown:
            raise ValueError(f"no small_cnn encoder for modalities {unknown}")
        return {m: classes[m]() for m in modalities}, SMALL_FEATURE_DIM
    raise ValueError(f"encoder family must be one of {ENCODER_FAMILIES}, got {family!r}")


def late_fusion_model(cfg, num_classes: int, modalities: Sequence[str]) -> nn.Module:
    """The late-fusion classifier a run's config asks for (encoder family and fusion head)."""
    from models.late_fusion import LateFusionClassifier

    encoders, width = build_encoders(getattr(cfg, "encoder", "resnet18"), modalities)
    return LateFusionClassifier(num_classes, modalities, cfg.fusion, encoders=encoders, feature_dim=width)
