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


# OGM-GE as its authors ran it (GeWu-Lab/OGM-GE_CVPR2022, main.py): SGD, momentum 0.9, weight
# decay 1e-4, lr 1e-3 divided by 10 every 70 epochs, the batch-mean CE, modulation in epochs
# 0..50; alpha as its README recommends (0.8 CREMA-D, 0.1 VGGSound; 0.1, its default setting,
# for AVE and Kinetics-Sounds).
OGM_GE_RECIPE = dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_step=70, lr_gamma=0.1,
                     loss_reduction="mean", ogm_alpha=0.1, ogm_modulation_starts=0, ogm_modulation_ends=50)

# Options a method brings with it: method -> dataset name (or "*" for all) -> options. They sit
# above the dataset's defaults and below --config and flags.
# On the embedded AVDigits, OGM-GE's lr is 1e-2, a deliberate difference: at the authors' 1e-3
# a seed-0 run of the demo's epochs was still far from converged (validation fusion accuracy
# 0.72 and rising at the last epoch; 0.80 at 1e-2, 0.83 at 3e-2; alpha 0.8 gave 0.80 too).
METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ogm_ge": {"*": OGM_GE_RECIPE, "CREMAD": dict(ogm_alpha=0.8), "AVDigits": dict(lr=1e-2)},
}


def recipe_defaults(spec: DatasetSpec, method: str | None) -> dict[str, Any]:
    """The defaults a run of ``method`` on ``spec`` starts from (before --config and flags)."""
    by_dataset = METHOD_DEFAULTS.get(method or "", {})
    return {**spec.defaults, **by_dataset.get("*", {}), **by_dataset.get(spec.name, {})}


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
    encoder: str = "resnet18"  # late fusion: resnet18 (released) or small_cnn (embedded set)
    # optimisation (released defaults: network Adam 1e-4 / wd 2e-4, coefficients Adam 1e-3)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 2e-4
    optimizer: str = "adam"   # network optimizer: adam (released OLM) or sgd (OGM-GE's recipe)
    momentum: float = 0.0     # SGD momentum (--optimizer sgd)
    loss_reduction: str = "sum"  # CE and OLM's norm loss summed over the batch, as released
    coef_lr: float = 1e-3
    coef_weight_decay: float = 0.0
    lr_step: int = 0          # StepLR period in epochs; 0 keeps the rate constant
    lr_gamma: float = 0.1
    # OLM
    target_scale: str = "reference"
    reference_steps: int = 0  # 0: one epoch of steps
    reference_tail: float = 0.25  # share of that window, its last part, averaged into L0 (1: all)
    heldout_norm: str = "batch"   # held-out forward normalized like training (batch) or eval (running)
    heldout_every: int = 3     # with --heldout-batch-size 32: OLM costs ~1.07x a joint step on CPU
    heldout_batch_size: int = 32
    ogm_alpha: float = 0.1    # OGM-GE modulation strength (its README: 0.8 CREMA-D, 0.1 VGGSound)
    ogm_modulation_starts: int = 0   # OGM-GE modulates in epochs starts..ends (0-based, inclusive)
    ogm_modulation_ends: int = 50
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
    splits_dir: str | None = None    # where the split files are (default: the dataset root, then data/<NAME>/)
    audio_root: str | None = None    # where the wav folders are (default: the dataset root)
    frames_root: str | None = None   # where the frame folders are (default: the dataset root)
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
    keep_checkpoints: str = "all"    # all, last, best or none (what is left when training ends)
    # --- mid fusion (main_trans.py): transformer, modalities, cross-validation, feature files ---
    model_type: str = "emt"          # emt, mbt, umt or ca
    modalities: str = "audio,visual"  # or audio,visual,text
    d_model: int = 768
    num_layers: int = 3
    num_heads: int = 8
    num_bottleneck: int = 12         # MBT bottleneck / EMT and UMT pivot tokens
    dropout: float = 0.1
    dim_feedforward: int = 0         # 0: the released width for the model type, scaled to d_model
    selection_metric: str = "acc"    # validation metric picking the best epoch: acc or f1_weighted
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
    "dataset": "dataset name, case-insensitive; AVDigits is embedded (no download)",
    "data_root": "dataset root folder (default: $OLM_<NAME>_ROOT, e.g. $OLM_CREMAD_ROOT, "
                 "else $OLM_DATA_ROOT/<NAME>, else ~/datasets/<NAME>)",
    "method": "training method (README, Methods)",
    "fusion": "late-fusion head: sum (add per-modality logits), concat (linear on concatenated "
              "features), film (one modality scales and shifts the other), gated (learned per-feature "
              "gate between modalities), attention (softmax weights over modalities), bilinear (released: "
              "two projections multiplied elementwise), bilinear_full (a full nn.Bilinear form)",
    "epochs": "training epochs (full passes over the train split)",
    "batch_size": "training batch in samples, global over all processes",
    "lr": "network learning rate",
    "optimizer": "network optimizer: adam (released OLM recipe) or sgd (OGM-GE's recipe)",
    "momentum": "SGD momentum (--optimizer sgd only)",
    "loss_reduction": "how the trained losses reduce over the batch: sum (released: summed CE, so "
                      "--weight-decay has the released strength) or mean",
    "ogm_modulation_starts": "first epoch (0-based) in which OGM-GE modulates (method ogm_ge only)",
    "ogm_modulation_ends": "last epoch (0-based, inclusive) in which OGM-GE modulates (method ogm_ge only)",
    "weight_decay": "network weight decay (coupled L2 term of Adam or SGD)",
    "coef_lr": "learning rate of OLM's logit coefficients (Adam)",
    "coef_weight_decay": "weight decay of OLM's logit coefficients",
    "lr_step": "multiply the network learning rate by --lr-gamma every N epochs (StepLR); 0 keeps it constant",
    "lr_gamma": "factor applied to the learning rate every --lr-step epochs",
    "target_scale": "OLM rate-target scale: reference (ratios sum to 1, released) or mean (ratios average 1)",
    "reference_steps": "training steps in OLM's reference window (0: one epoch of steps)",
    "heldout_every": "run OLM's held-out forward every N training steps (losses reused in between; every step "
                     "of the reference window's tail, see --reference-tail)",
    "heldout_batch_size": "batch of OLM's held-out forward in samples, drawn from the val split",
    "reference_tail": "share (0-1] of OLM's reference window, its last part, averaged into the reference "
                      "losses L0 (1: the whole window's mean)",
    "heldout_norm": "how OLM's held-out forward normalizes: batch (the held-out batch's own statistics, "
                    "like the training losses; running statistics and dropout untouched) or running "
                    "(eval mode)",
    "cpu_threads": "torch threads when training on the CPU (0: torch's default)",
    "encoder": "late-fusion encoders: resnet18 (released) or small_cnn (a light CNN for the embedded set)",
    "ogm_alpha": "OGM-GE modulation strength alpha, unitless (method ogm_ge only)",
    "fps": "frames per clip fed to the visual encoder",
    "image_size": "side of the square frames fed to the visual encoder, in pixels",
    "augment": "random resized crop and horizontal flip on training frames",
    "sample_rate": "audio resampling rate in Hz",
    "audio_seconds": "audio length per clip in seconds (cropped or zero-padded)",
    "n_fft": "STFT window in samples (the spectrogram has n_fft/2+1 frequency bins)",
    "hop_length": "STFT hop in samples",
    "spec_frames": "spectrogram time frames fed to the audio encoder (cropped or padded)",
    "val_fraction": "share of train (0-1) carved out as validation where a dataset has no val split",
    "max_missing": "fail when more than this share (0-1) of a split's clips is missing or unreadable",
    "splits_dir": "folder holding the split files (CREMA-D train.csv/test.csv, AVE trainSet.txt/valSet.txt/testSet.txt or my_train.txt/my_test.txt, Kinetics-Sounds my_train.txt/my_test.txt, VGGSound vggsound.csv); default: the dataset root, then data/<NAME>/ in the repository",
    "audio_root": "folder holding the wav folders (AudioWAV/, audio/, audio_train/, train-audios/...) when they are not under --data-root",
    "frames_root": "folder holding the frame folders (Image-01-FPS/, visual/, train-videos/...) when they are not under --data-root",
    "spec_cache": "cache spectrograms on disk under $OLM_CACHE, keyed by the audio parameters",
    "seed": "random seed of initialisation, shuffling and augmentation",
    "device": "auto (CUDA if available), cpu, cuda or cuda:N",
    "workers": "data-loader worker processes per training process (0: load in the main process)",
    "eval_batch_size": "val/test batch in samples (0: twice --batch-size)",
    "amp": "mixed precision on CUDA: none, bf16 or fp16 (ignored on CPU)",
    "channels_last": "channels-last memory layout for image tensors (faster convolutions on recent GPUs)",
    "out": "run folder (default runs/<dataset>-<method>-<fusion>-s<seed>-<time>)",
    "resume": "continue from a run folder (its last.pt) or a checkpoint file; the saved options apply",
    "progress": "show progress bars",
    "plots": "write the diagnostics figure at the end",
    "keep_checkpoints": "checkpoints left when training ends: all (best.pt and last.pt), last (last.pt, "
                        "can resume), best (best.pt, weights only), none; last.pt is written during "
                        "training whatever the choice",
}


# Options only main.py reads (clips, spectrograms, frames, the late-fusion head and OGM-GE,
# which needs its read-out heads); main_trans.py leaves them out of its --help.
LATE_FUSION_FIELDS = ("fusion", "encoder", "ogm_alpha", "ogm_modulation_starts", "ogm_modulation_ends", "fps",
                      "image_size", "augment", "sample_rate", "audio_seconds", "n_fft", "hop_length",
                      "spec_frames", "val_fraction", "spec_cache", "channels_last", "splits_dir", "audio_root",
                      "frames_root")
KEEP_CHECKPOINTS = ("all", "last", "best", "none")


def choices() -> dict[str, tuple[str, ...]]:
    """Flag -> accepted values, read from the registries so a newly registered method,
    fusion head or model type is accepted (and listed in errors) with no edit here."""
    from engines.methods import METHODS, check_method_name
    from models.fusion import FUSIONS
    from models.transformers.build import TRANSFORMER_TYPES

    check_method_name("olm")  # imports the baselines, which register themselves
    return {"dataset": tuple(s.name for s in DATASETS.values()), "method": tuple(sorted(METHODS)),
            "fusion": tuple(FUSIONS), "model_type": tuple(TRANSFORMER_TYPES),
            "target_scale": ("reference", "mean"), "amp": ("none", "bf16", "fp16"),
            "selection_metric": ("acc", "f1_weighted"),
            "heldout_norm": ("batch", "running"), "encoder": ("resnet18", "small_cnn"),
            "keep_checkpoints": KEEP_CHECKPOINTS, "optimizer": ("adam", "sgd"),
            "loss_reduction": ("sum", "mean")}


# Options only main_trans.py reads; main.py leaves them out of its --help.
MID_FUSION_FIELDS = ("model_type", "modalities", "d_model", "num_layers", "num_heads", "num_bottleneck",
                     "dropout", "dim_feedforward", "selection_metric", "folds", "max_folds", "fold_seed", "label_file", "audio_feature",
                     "visual_feature", "text_feature", "feature_dim")


def build_parser(description: str, skip=(), help_text: dict[str, str] | None = None,
                 shown_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """One flag per Config field (except ``skip``); ``help_text`` overrides HELP per field and
    ``shown_defaults`` the default printed for it (an entry point's own default)."""
    parser = argparse.ArgumentParser(description=description)  # defaults are shown in [brackets]
    parser.add_argument("--config", help="YAML file of config values (flags override it)")
    defaults = Config()
    helps = {**HELP, **(help_text or {})}
    accepted = choices()
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        default = (shown_defaults or {}).get(f.name, getattr(defaults, f.name))
        text = helps.get(f.name, f.name.replace("_", " "))
        allowed = accepted.get(f.name, ())
        if allowed and not all(value in text for value in allowed):
            text += f"; one of: {', '.join(allowed)}"  # from the registries, so never out of date
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{text} [{default}]")
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
    method = values.get("method", from_file.get("method", saved.get("method", Config.method)))
    merged = {**recipe_defaults(spec, method), **saved, **from_file, **values, "dataset": spec.name}
    return validate(Config(**merged))


POSITIVE = ("epochs", "batch_size", "heldout_every", "heldout_batch_size", "fps", "image_size",
            "sample_rate", "n_fft", "hop_length", "spec_frames")


def validate(cfg: Config) -> Config:
    """Catch values that would otherwise fail deep inside training with a traceback."""
    from engines.methods import check_method_name

    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise UserError(f"{_flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "coef_lr", "audio_seconds"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 < cfg.reference_tail <= 1:
        raise UserError(f"--reference-tail must be in (0, 1], got {cfg.reference_tail}")
    for name, allowed in choices().items():
        value = getattr(cfg, name)
        if name == "dataset":
            value = get_dataset_spec(value).name  # case-insensitive; its own sentence
        if name == "method":
            check_method_name(value)  # "unknown method ...", as the other entry paths say it
        if value not in allowed:
            raise UserError(f"{_flag(name)} {value!r} is not one of: {', '.join(allowed)}")
    return cfg


def entry_parser(description: str, argv=None, skip=(), help_text: dict[str, str] | None = None,
                 default_dataset: str = "AVDigits") -> argparse.ArgumentParser:
    """An entry point's parser whose --help shows the defaults of the dataset that ``argv``
    names with --dataset or in its --config file (else ``default_dataset``)."""
    import sys

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--dataset")
    early.add_argument("--method")
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    from_file: dict[str, Any] = {}
    if known.config:
        try:
            loaded = yaml.safe_load(Path(known.config).read_text()) or {}
            from_file = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError):
            pass  # resolve_config reports the unreadable file
    dataset = known.dataset or from_file.get("dataset") or default_dataset
    method = known.method or from_file.get("method") or Config.method
    spec = DATASETS.get(str(dataset).lower()) or get_dataset_spec(default_dataset)
    shown = {**recipe_defaults(spec, method), "dataset": spec.name, "method": method}
    return build_parser(f"{description} Defaults shown are those of --dataset {spec.name} "
                        f"with --method {method}.", skip=skip, help_text=help_text, shown_defaults=shown)


def resumed_options(resume: str) -> dict[str, Any]:
    from utils.checkpoint import saved_config

    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in saved_config(resume).items() if k in names}


def load_config_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run folder or checkpoint, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names})
