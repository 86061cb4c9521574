"""Fixtures shared by the scaling tests (resume, torchrun, bad input): a trimmed copy of
AV-Digits small enough for several training processes per test, and a tiny in-process model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
# Small inputs keep a step well under a second on a CPU. Loading in-process (--workers 0)
# saves forking the test process for every loader; the tests of loader workers (resume,
# torchrun, spectrogram cache) ask for them.
TINY_FLAGS = ["--image-size", "16", "--spec-frames", "16", "--n-fft", "62", "--batch-size", "8",
              "--heldout-batch-size", "8", "--no-progress", "--no-plots", "--device", "cpu", "--workers", "0"]


def full_avdigits(cache: Path) -> Path:
    """AV-Digits materialized once per test session (later calls return at once): in the
    session's $OLM_CACHE (tests/conftest.py sets it), else under ``cache``."""
    from datasets import avdigits

    base = Path(os.environ.get("OLM_CACHE") or cache)
    return avdigits.materialize(base / f"AVDigits-{avdigits.params_key()}")


def tiny_avdigits(source: Path, dest: Path, sizes=(32, 16, 16)) -> Path:
    """Copy the first clips of each split (and the marker, so AV-Digits accepts the folder
    as its own) into ``dest``; pass it as --data-root."""
    dest = Path(dest)
    (dest / "audio").mkdir(parents=True)
    (dest / "Image-01-FPS").mkdir()
    for split, size in zip(("train", "val", "test"), sizes):
        lines = (source / f"{split}.csv").read_text().splitlines()[:size]
        (dest / f"{split}.csv").write_text("".join(line + "\n" for line in lines))
        for line in lines:
            clip = line.split(",")[0]
            shutil.copy(source / "audio" / f"{clip}.wav", dest / "audio" / f"{clip}.wav")
            shutil.copytree(source / "Image-01-FPS" / clip, dest / "Image-01-FPS" / clip)
    for name in ("classes.txt", ".materialized.json"):
        shutil.copy(source / name, dest / name)
    return dest


def clips_of(root: Path, split: str) -> list[str]:
    return [line.split(",")[0] for line in (Path(root) / f"{split}.csv").read_text().splitlines()]


def script_env(cache: Path) -> dict:
    env = dict(os.environ, OLM_CACHE=str(cache), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def main_command(*args) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), *TINY_FLAGS, *map(str, args)]


def run_main(cache: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(*args), cwd=REPO, env=script_env(cache), capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, one 'error: ...' line naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class VectorDataset(Dataset):
    """Sample i: {"audio": (4,), "visual": (4,)} with a label the inputs predict (weakly)."""

    def __init__(self, size: int, classes: int = 3, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(classes, (size,), generator=generator)
        centers = torch.randn(classes, 4, generator=generator)
        self.audio = centers[self.labels] + 0.5 * torch.randn(size, 4, generator=generator)
        self.visual = centers[self.labels] + 2.0 * torch.randn(size, 4, generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"audio": self.audio[i], "visual": self.visual[i]}, int(self.labels[i])


class VectorModel(nn.Module):
    """Two small encoders with BatchNorm (whose buffers DDP ranks must agree on), unimodal
    heads and a concat fusion head; the late-fusion interface at toy scale."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.heads = ("audio", "visual", "fusion")
        self.modalities = ("audio", "visual")
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU())
                                       for m in self.modalities})
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(16, classes) for m in self.modalities})
        self.fusion = nn.Linear(32, classes)
        self.detach_unimodal_heads = False

    def forward(self, inputs):
        features = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        logits = {m: self.unimodal_heads[m](features[m].detach() if self.detach_unimodal_heads
                                            else features[m]) for m in self.modalities}
        logits["fusion"] = self.fusion(torch.cat([features[m] for m in self.modalities], dim=1))
        return logits


def vector_data(train=96, val=30, test=31):
    from datasets.builders import DataBundle

    return DataBundle(VectorDataset(train, seed=0), VectorDataset(val, seed=1), VectorDataset(test, seed=2),
                      ["a", "b", "c"])
