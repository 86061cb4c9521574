"""The single registry of datasets and the training configuration.

Precedence, lowest first: ``Config`` defaults, the dataset's registered defaults, a YAML file
(``--config``), then command-line flags. The resolved config is written into the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
        if self.name == "AVDigits":
            return None  # materialized on first use under cache_home(), keyed by its parameters
        return data_home() / self.name


# Released recipe for the real audio-visual sets (DATASETS.md): 257x188 spectrograms,
# 224x224 frames, bilinear fusion, batch 64, Adam 1e-4.
RELEASED_AV = dict(fusion="bilinear", batch_size=64, lr=1e-4, image_size=224, augment=True,
                   sample_rate=22050, audio_seconds=3.0, n_fft=512, hop_length=353, spec_frames=188)

DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name.lower()] = spec
    return spec


# AV-Digits defaults, measured on the 2-core CPU machine: 64x64 spectrograms (8 kHz, 1 s) and
# 16x16 frames keep the main job within minutes; flips and crops would change digits; concat
# fusion because Adam at 1e-3 (needed to learn in 10 epochs from scratch) drives a bilinear
# head's logit norms into the thousands on this small set.
register_dataset(DatasetSpec(
    "AVDigits", "datasets.builders:build_avdigits", classes=10,
    defaults=dict(fusion="concat", batch_size=64, lr=1e-3, image_size=16, augment=False,
                  sample_rate=8000, audio_seconds=1.0, n_fft=126, hop_length=125, spec_frames=64)))

# Feature-sequence datasets for the mid-fusion transformers (main_trans.py). The transformers'
# released optimisers: network and coefficients both Adam 1e-4, weight decay 2e-4.
register_dataset(DatasetSpec(
    "MERMULTI", "datasets.mer:build_mer", kind="mer", classes=6,
    defaults=dict(lr=1e-4, weight_decay=2e-4, coef_lr=1e-4, coef_weight_decay=2e-4, batch_size=64,
                  feature_dim=1024, folds=5)))
# AV-Digits turned into feature sequences: sized so that every model type runs two folds on
# a 2-core CPU within minutes (measured in docs/olm_trans.md). One CPU thread: its tiny
# matrices gain little from a second one, and on a busy machine two threads ran up to 9x slower.
register_dataset(DatasetSpec(
    "AVDigitsFeatures", "datasets.mer_avdigits:build_avdigits_features", kind="mer", classes=10,
    defaults=dict(lr=1e-3, weight_decay=2e-4, coef_lr=1e-3, coef_weight_decay=0.0, batch_size=64,
                  epochs=15, d_model=64, num_layers=2, num_heads=4, num_bottleneck=4, dropout=0.1,
                  folds=5, max_folds=2, audio_feature="logmel-40", visual_feature="rows-8",
                  text_feature="noisy-tokens", cpu_threads=1)))

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


@dataclass
class Config:
    # what to train
    dataset: str = "AVDigits"
    data_root: str | None = None
    method: str = "olm"
    fusion: str = "bilinear"
    # optimisation (released defaults: network Adam 1e-4 / wd 2e-4, coefficients Adam 1e-3)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 2e-4
    coef_lr: float = 1e-3
    coef_weight_decay: float = 0.0
    lr_step: int = 0          # StepLR period in epochs; 0 keeps the rate constant
    lr_gamma: float = 0.1
    # OLM
    target_scale: str = "reference"
    reference_steps: int = 0  # 0: one epoch of steps
    heldout_every: int = 3     # with --heldout-batch-size 32: OLM costs ~1.07x a joint step on CPU
    heldout_batch_size: int = 32
    ogm_alpha: float = 0.1    # OGM-GE modulation strength (the paper suggests 0.8 for CREMA-D)
    # inputs
    fps: int = 1              # frames per clip
    image_size: int = 224
    augment: bool = True
    sample_rate: int = 22050
    audio_seconds: float = 3.0
    n_fft: int = 512
    hop_length: int = 353
    spec_frames: int = 188
    val_fraction: float = 0.1
    max_missing: float = 0.05
    spec_cache: bool = True
    # running
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    eval_batch_size: int = 0  # 0: twice the training batch
    amp: str = "none"
    channels_last: bool = False
    out: str | None = None
    resume: str | None = None
    progress: bool = True
    plots: bool = True
    # --- mid fusion (main_trans.py): transformer, modalities, cross-validation, feature files ---
    model_type: str = "emt"          # emt, mbt, umt or ca
    modalities: str = "audio,visual"  # or audio,visual,text
    d_model: int = 768
    num_layers: int = 3
    num_heads: int = 8
    num_bottleneck: int = 12         # MBT bottleneck / EMT and UMT pivot tokens
    dropout: float = 0.1
    folds: int = 5
    max_folds: int = 0               # run only the first N folds (0: all)
    fold_seed: int = 0               # fixes the fold assignment whatever --seed is
    label_file: str | None = None    # a .npz here is read with pickle: only a user-named file
    audio_feature: str = "chinese-hubert-large-FRA"
    visual_feature: str = "manet_FRA"
    text_feature: str = "chinese-macbert-large-4-FRA"
    feature_dim: int = 0             # width of every feature file (0: infer per modality)
    cpu_threads: int = 0             # torch threads on CPU (0: torch's default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


HELP = {
    "dataset": "dataset name, case-insensitive (default AVDigits, embedded, no download)",
    "data_root": "dataset root folder (default: $OLM_<NAME>_ROOT, else $OLM_DATA_ROOT/<NAME>)",
    "method": "training method: olm, olm_loss_ratio, joint, ... (see README)",
    "fusion": "late-fusion head: sum, concat, film, gated, attention, bilinear",
    "lr": "network learning rate (Adam)", "coef_lr": "OLM coefficient learning rate (Adam)",
    "target_scale": "OLM rate target scale: reference (released) or mean",
    "reference_steps": "steps averaged into OLM's reference losses (0 = one epoch)",
    "heldout_every": "run OLM's held-out forward every K steps (losses reused in between)",
    "heldout_batch_size": "batch size of OLM's held-out forward",
    "ogm_alpha": "OGM-GE modulation strength alpha (method ogm_ge)",
    "fps": "frames per clip fed to the visual encoder",
    "augment": "random resized crop and flip on training frames",
    "val_fraction": "validation share carved from train where a dataset has no val split",
    "max_missing": "fail when more than this fraction of a split's clips is missing",
    "spec_cache": "cache spectrograms on disk, keyed by the audio parameters",
    "device": "auto, cpu, cuda or cuda:N", "workers": "data-loader worker processes",
    "amp": "mixed precision on CUDA: none, bf16 or fp16",
    "out": "run folder (default runs/<dataset>-<method>-<fusion>-s<seed>)",
    "resume": "continue from a run folder or a checkpoint file",
    "progress": "show progress bars", "plots": "write the diagnostic figure at the end",
}


# Options only main_trans.py reads; main.py leaves them out of its --help.
MID_FUSION_FIELDS = ("model_type", "modalities", "d_model", "num_layers", "num_heads", "num_bottleneck",
                     "dropout", "folds", "max_folds", "fold_seed", "label_file", "audio_feature",
                     "visual_feature", "text_feature", "feature_dim", "cpu_threads")


def build_parser(description: str, skip=(), help_text: dict[str, str] | None = None,
                 shown_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """One flag per Config field (except ``skip``); ``help_text`` overrides HELP per field and
    ``shown_defaults`` the default printed for it (an entry point's own default)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of config values (flags override it)")
    defaults = Config()
    helps = {**HELP, **(help_text or {})}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        default = (shown_defaults or {}).get(f.name, getattr(defaults, f.name))
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                      help=helps.get(f.name, f.name.replace("_", " ")) + f" [{default}]")
        field_default = getattr(defaults, f.name)
        if isinstance(field_default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(field_default) if field_default is not None else str
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    values = dict(vars(args))
    config_file = values.pop("config", None)
    from_file: dict[str, Any] = {}
    if config_file:
        try:
            from_file = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"cannot read --config {config_file}: {error}") from None
        unknown = set(from_file) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise UserError(f"--config {config_file} has unknown keys: {', '.join(sorted(unknown))}")
    # A resumed run starts from the options saved in its checkpoint; flags still override.
    resume = values.get("resume", from_file.get("resume"))
    saved = resumed_options(resume) if resume else {}
    dataset = values.get("dataset", from_file.get("dataset", saved.get("dataset", Config.dataset)))
    spec = get_dataset_spec(dataset)
    merged = {**spec.defaults, **saved, **from_file, **values, "dataset": spec.name}
    return validate(Config(**merged))


POSITIVE = ("epochs", "batch_size", "heldout_every", "heldout_batch_size", "fps", "image_size",
            "sample_rate", "n_fft", "hop_length", "spec_frames")


def validate(cfg: Config) -> Config:
    """Catch values that would otherwise fail deep inside training with a traceback."""
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise UserError(f"{_flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "coef_lr", "audio_seconds"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.target_scale not in ("reference", "mean"):
        raise UserError(f"--target-scale must be reference or mean, got {cfg.target_scale!r}")
    return cfg


def resumed_options(resume: str) -> dict[str, Any]:
    from utils.checkpoint import saved_config

    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in saved_config(resume).items() if k in names}


def load_config_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run folder or checkpoint, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names})
