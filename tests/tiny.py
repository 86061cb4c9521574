"""Tiny stand-ins shared by tests: an indexed synthetic dataset and a small multi-head model
with BatchNorm and dropout (the layers a held-out pass must not disturb)."""
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datasets.av_base import collate_skipping_bad


class IndexedDataset(Dataset):
    """Sample i: inputs {"audio": (4,), "visual": (4,), "index": i}, label i % classes."""

    def __init__(self, size, classes=3, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.audio = torch.randn(size, 4, generator=generator)
        self.visual = torch.randn(size, 4, generator=generator)
        self.classes = classes

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        return {"audio": self.audio[i], "visual": self.visual[i], "index": torch.tensor(i)}, i % self.classes


class TinyModel(nn.Module):
    """Two encoders with BatchNorm and dropout, unimodal heads and a concat fusion head.
    Records the indices it was trained on, and the training flag of every forward."""

    def __init__(self, classes=3):
        super().__init__()
        self.heads = ("audio", "visual", "fusion")
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                                        nn.Dropout(0.5)) for m in ("audio", "visual")})
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(8, classes) for m in ("audio", "visual")})
        self.fusion = nn.Linear(16, classes)
        self.detach_unimodal_heads = False
        self.seen_in_training: list[int] = []
        self.forward_modes: list[bool] = []

    def forward(self, inputs):
        self.forward_modes.append(self.training)
        if self.training and torch.is_grad_enabled():
            self.seen_in_training.extend(inputs["index"].tolist())
        features = {m: self.encoders[m](inputs[m]) for m in ("audio", "visual")}
        logits = {m: self.unimodal_heads[m](features[m].detach() if self.detach_unimodal_heads else features[m])
                  for m in ("audio", "visual")}
        logits["fusion"] = self.fusion(torch.cat([features["audio"], features["visual"]], dim=1))
        return logits


def loader(dataset, batch_size, shuffle, seed=0):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_skipping_bad,
                      generator=torch.Generator().manual_seed(seed))


def tiny_late_fusion(fusion: str, classes: int, features: int, seed: int = 0, inputs: int = 6,
                     batch_norm: bool = False):
    """A LateFusionClassifier with two small MLP encoders on ``inputs``-wide vectors; with
    ``batch_norm`` their hidden layer is normalized (eval and train mode then differ)."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    hidden = lambda: [nn.Linear(inputs, 32), *([nn.BatchNorm1d(32)] if batch_norm else []), nn.ReLU()]
    encoders = {m: nn.Sequential(*hidden(), nn.Linear(32, features)) for m in ("audio", "visual")}
    return LateFusionClassifier(classes, ("audio", "visual"), fusion, encoders=encoders, feature_dim=features)
