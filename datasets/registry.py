"""The registry of datasets: each name's loader, kind and defaults (the dataset's recipe).

Precedence of a run's options, lowest first: ``config.Config`` defaults, the dataset's
defaults registered here, the method's recipe, a YAML file (``--config``), then flags.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError


def data_home() -> Path:
    """Where real datasets live unless a flag or a per-dataset variable says otherwise."""
    return Path(os.environ.get("OLM_DATA_ROOT", Path.home() / "datasets")).expanduser()


def cache_home() -> Path:
    """Generated data (AV-Digits, spectrogram caches); never inside the git checkout."""
    return Path(os.environ.get("OLM_CACHE", Path.home() / ".cache" / "olm")).expanduser()


@dataclass(frozen=True)
class DatasetSpec:
    name: str            # canonical spelling, also the folder name under data_home()
    builder: str         # "module:function" returning a DataBundle (imported lazily)
    kind: str = "av"     # "av": late fusion on wav + frames; "mer": mid fusion on features
    classes: int | None = None  # in the released setup (documentation; loaders read the data)
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def root_env(self) -> str:
        return f"OLM_{self.name.upper()}_ROOT"

    def default_root(self) -> Path | None:
        if os.environ.get(self.root_env):
            return Path(os.environ[self.root_env]).expanduser()
        if self.name in ("AVDigits", "AVDigitsImbalanced"):
            return None  # materialized on first use under cache_home(), keyed by its parameters
        return data_home() / self.name


# Released recipe for the real audio-visual sets (DATASETS.md): 257x188 spectrograms,
# 224x224 frames, bilinear fusion, batch 64, Adam 1e-4.
# OLM's held-out signal as released: a fresh held-out batch of the training batch's size at every
# step (on a GPU that forward is cheap; the CPU-sized cadence is AV-Digits').
RELEASED_AV = dict(fusion="bilinear", batch_size=64, lr=1e-4, image_size=224, augment=True,
                   sample_rate=22050, audio_seconds=3.0, n_fft=512, hop_length=353, spec_frames=188,
                   heldout_every=1, heldout_batch_size=64)

DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name.lower()] = spec
    return spec


# AV-Digits defaults, measured on the 2-core CPU machine: 64x64 spectrograms (8 kHz, 1 s) and
# 16x16 frames; flips and crops would change digits; concat fusion because Adam at 1e-3
# (needed to learn from scratch in minutes) drives a bilinear head's logit norms into the
# thousands on this small set. Sized so OLM's coefficients can act (issue 9): batch 16 and 10
# epochs make 790 coefficient steps (a released CREMA-D run makes ~1,000); the light small_cnn
# encoder, one torch thread and one loader worker (loading, not the model, is half an
# epoch's time) keep the main job near 3 minutes on the slowest 2-core machine; a held-out
# batch of 16 (the training batch, so its batch statistics compare like with like) every 32
# steps keeps OLM's step within 1.05x joint's (bench_olm_overhead.py: a held-out forward
# costs about a third of a training step and OLM's per-step coefficient work about 2%; every
# 8 steps measured 1.07x, every 16 steps 1.04-1.05x).
register_dataset(DatasetSpec(
    "AVDigits", "datasets.builders:build_avdigits", classes=10,
    defaults=dict(fusion="concat", encoder="small_cnn", batch_size=16, epochs=10, lr=1e-3,
                  heldout_batch_size=16, heldout_every=32, workers=1, cpu_threads=1,
                  image_size=16, augment=False,
                  sample_rate=8000, audio_seconds=1.0, n_fft=126, hop_length=125, spec_frames=64)))

# AV-Digits with measured imbalance (issue 18): clean audio, a visual digit to be found on a
# larger noisy board (datasets/avdigits.py IMBALANCED). Its recipe and sizes were chosen by
# benchmarks/imbalance_search.py; the selection log is docs/results/imbalance-selection.md.
AVDIGITS_IMBALANCED_DEFAULTS = dict(fusion="concat", encoder="small_cnn", batch_size=16, epochs=10, lr=1e-3,
                                    heldout_batch_size=16, heldout_every=32, workers=1, cpu_threads=1,
                                    image_size=24, augment=False, sample_rate=8000, audio_seconds=1.0,
                                    n_fft=126, hop_length=125, spec_frames=64)
register_dataset(DatasetSpec("AVDigitsImbalanced", "datasets.builders:build_avdigits_imbalanced", classes=10,
                             defaults=AVDIGITS_IMBALANCED_DEFAULTS))

# Feature-sequence datasets for the mid-fusion transformers (main_trans.py). The released
# OLM-Trans recipe: network and coefficients both Adam 1e-4 with weight decay 2e-4, batch 2
# (sequences reach ~2,300 steps), 10 epochs, 5 folds, d_model 768, 3 layers, 8 heads, 12
# pivot/bottleneck tokens, dropout 0.1, each model's released feed-forward width
# (--dim-feedforward 0); held-out batches as large as training ones, as released. The best
# epoch is picked on validation weighted F1, MER2023's emotion metric.
register_dataset(DatasetSpec(
    "MERMULTI", "datasets.mer:build_mer", kind="mer", classes=6,
    defaults=dict(lr=1e-4, weight_decay=2e-4, coef_lr=1e-4, coef_weight_decay=2e-4, batch_size=2,
                  heldout_batch_size=2, epochs=10, d_model=768, num_layers=3, num_heads=8,
                  num_bottleneck=12, dropout=0.1, dim_feedforward=0, feature_dim=1024, folds=5,
                  max_folds=0, modalities="audio,visual", selection_metric="f1_weighted")))
# AV-Digits turned into feature sequences: sized so that every model type runs two folds on
# a 2-core CPU within minutes (measured in docs/olm_trans.md). One CPU thread: its tiny
# matrices gain little from a second one, and on a busy machine two threads ran up to 9x slower.
register_dataset(DatasetSpec(
    "AVDigitsFeatures", "datasets.mer_avdigits:build_avdigits_features", kind="mer", classes=10,
    defaults=dict(lr=1e-3, weight_decay=2e-4, coef_lr=1e-3, coef_weight_decay=0.0, batch_size=64,
                  epochs=15, d_model=64, num_layers=2, num_heads=4, num_bottleneck=4, dropout=0.1,
                  dim_feedforward=0, folds=5, max_folds=2, modalities="audio,visual",
                  selection_metric="f1_weighted", audio_feature="logmel-40", visual_feature="rows-8",
                  text_feature="noisy-tokens", cpu_threads=1,
                  loss_reduction="mean")))  # docs/olm_trans.md's figures were measured with batch means

# The real sets, as data/<NAME>/ preprocessing lays them out (loaders: datasets/real_av.py).
# ``classes`` is the released count; the loaders take the classes from the training clips.
register_dataset(DatasetSpec("CREMAD", "datasets.real_av:build_cremad", classes=6,
                             defaults=dict(RELEASED_AV)))
register_dataset(DatasetSpec("AVE", "datasets.real_av:build_ave", classes=28,
                             defaults=dict(RELEASED_AV)))
register_dataset(DatasetSpec("KineticSound", "datasets.real_av:build_kinetics_sounds", classes=31,
                             defaults=dict(RELEASED_AV)))
register_dataset(DatasetSpec("VGGSound", "datasets.real_av:build_vggsound", classes=309,
                             defaults=dict(RELEASED_AV)))


def get_dataset_spec(name: str) -> DatasetSpec:
    spec = DATASETS.get(name.lower())
    if spec is None:
        names = ", ".join(s.name for s in DATASETS.values())
        raise UserError(f"unknown dataset {name!r} (--dataset); choose one of: {names}")
    return spec
