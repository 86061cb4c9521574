"""The training configuration: general settings, composed with the dataset's own
(``datasets.registry``) and the method's own (declared beside each method in ``olmbalance``).

Precedence, lowest first: ``Config`` defaults, the dataset's registered defaults, the method's
recipe (``--recipe``), a YAML file (``--config``), then command-line flags. The resolved config
is written into the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import olmbalance
from datasets.registry import (DATASETS, RELEASED_AV, DatasetSpec, cache_home, data_home,  # noqa: F401
                               get_dataset_spec, register_dataset)
from utils.errors import UserError


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
    optimizer: str = "adam"   # network optimizer: adam (released OLM), sgd (OGM-GE's), adamw (BalanceBenchmark's)
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
    # a method's own settings, by prefixed key (pmr_alpha, ogm_alpha, ...): flags --pmr-alpha, ...
    method_settings: dict[str, Any] = field(default_factory=dict)
    recipe: str = "default"   # default, dataset or authors (see recipe_defaults)
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
    channels_last: bool | None = None  # None: on with CUDA, off on the CPU (utils/device.py)
    compile: bool = False     # torch.compile the late-fusion model (utils/device.py)
    out: str | None = None
    resume: str | None = None
    progress: bool = True
    plots: bool = True
    imbalance: bool = True       # probes, reliance, Shapley from best.pt after training
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
    "optimizer": "network optimizer: adam (released OLM recipe), sgd (OGM-GE's recipe) or adamw (BalanceBenchmark's)",
    "momentum": "SGD momentum (--optimizer sgd only)",
    "loss_reduction": "how the trained losses reduce over the batch: sum (released: summed CE, so "
                      "--weight-decay has the released strength) or mean",
    "recipe": "optimizer, schedule, epochs and batch: default (the dataset's recipe shared by all methods; "
              "OGM-GE keeps its authors' optimizer and schedule), dataset, or authors (what the method's "
              "authors ran, README 'Methods')",
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
    "channels_last": "channels-last memory layout for the model and image tensors (faster convolutions on "
                     "recent GPUs); default auto: on with CUDA, off on the CPU",
    "compile": "torch.compile the late-fusion model (its forward, in place; checkpoints unchanged); the "
               "first steps of each shape and mode pay the compilation",
    "out": "run folder (default runs/<dataset>-<method>-<fusion>-s<seed>-<time>)",
    "resume": "continue from a run folder (its last.pt) or a checkpoint file; the saved options apply",
    "progress": "show progress bars",
    "plots": "write the diagnostics figure at the end",
    "imbalance": "after training, measure modality imbalance on best.pt: a linear probe per modality, the "
                 "fusion head's reliance on each modality, Shapley values (results.json 'imbalance', "
                 "predictions.npz; engines/imbalance.py)",
    "keep_checkpoints": "checkpoints left when training ends: all (best.pt and last.pt), last (last.pt, "
                        "can resume), best (best.pt, weights only), none; last.pt is written during "
                        "training whatever the choice",
}


# Options only main.py reads (clips, spectrograms, frames, the late-fusion head and OGM-GE,
# which needs its read-out heads); main_trans.py leaves them out of its --help.
LATE_FUSION_FIELDS = ("fusion", "encoder", "fps",
                      "image_size", "augment", "sample_rate", "audio_seconds", "n_fft", "hop_length",
                      "spec_frames", "val_fraction", "spec_cache", "channels_last", "compile", "splits_dir", "audio_root",
                      "frames_root", "imbalance")
# On/off flags whose default None means "decided per device" (shown as auto in --help).
AUTO_BOOLEANS = ("channels_last",)
KEEP_CHECKPOINTS = ("all", "last", "best", "none")


def choices() -> dict[str, tuple[str, ...]]:
    """Flag -> accepted values, read from the registries so a newly registered method,
    fusion head or model type is accepted (and listed in errors) with no edit here."""
    from models.fusion import FUSIONS
    from models.transformers.build import TRANSFORMER_TYPES

    return {"dataset": tuple(s.name for s in DATASETS.values()), "method": tuple(sorted(olmbalance.METHODS)),
            "recipe": RECIPES,
            "fusion": tuple(FUSIONS), "model_type": tuple(TRANSFORMER_TYPES),
            "target_scale": ("reference", "mean"), "amp": ("none", "bf16", "fp16"),
            "selection_metric": ("acc", "f1_weighted"),
            "heldout_norm": ("batch", "running"), "encoder": ("resnet18", "small_cnn"),
            "keep_checkpoints": KEEP_CHECKPOINTS, "optimizer": ("adam", "adamw", "sgd"),
            "loss_reduction": ("sum", "mean")}


# Options only main_trans.py reads; main.py leaves them out of its --help.
MID_FUSION_FIELDS = ("model_type", "modalities", "d_model", "num_layers", "num_heads", "num_bottleneck",
                     "dropout", "dim_feedforward", "selection_metric", "folds", "max_folds", "fold_seed", "label_file", "audio_feature",
                     "visual_feature", "text_feature", "feature_dim")


RECIPES = ("default", "dataset", "authors")
NOT_FLAGS = ("method_settings",)  # filled from each method's own flags


def recipe_defaults(spec: DatasetSpec, method: str | None, recipe: str = "default") -> dict[str, Any]:
    """The defaults a run of ``method`` on ``spec`` starts from (before --config and flags): the
    dataset's recipe, then the method's ``recipe`` (``default``: what the method declares as its
    default, usually nothing; ``dataset``: nothing; ``authors``: its authors' run)."""
    entry = olmbalance.METHODS.get(method or "")
    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r} is not one of: {', '.join(RECIPES)}")
    chosen = entry.recipe(recipe, spec.name) if entry is not None and recipe != "dataset" else {}
    return {**spec.defaults, **chosen}


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one sentence, with the closest flag when one is misspelt)."""

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flags = [w.split("=")[0] for w in words if w.startswith("--")]
            known = [o for action in self._actions for o in action.option_strings]
            hints = [f"{f} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(f, known, 1)) else f
                     for f in flags]
            raise UserError(f"unknown option {', '.join(hints or words)}; see --help")
        raise UserError(message)


def add_method_flags(parser: argparse.ArgumentParser, shown_method: str | None,
                     shown_defaults: dict[str, Any]) -> None:
    """One flag per method setting (``--pmr-alpha``); only ``shown_method``'s appear in --help,
    with the values that apply; the others are still parsed, so using one with another method
    gets its own sentence (``validate_method_settings``)."""
    group = parser.add_argument_group(f"settings of --method {shown_method}")
    for key, (entry, setting) in olmbalance.registry.setting_keys().items():
        shown = entry.name == shown_method
        default = shown_defaults.get(key, setting.default)
        text = f"{setting.help} ({entry.name} only) [{default}]"
        if setting.choices:
            text += f"; one of: {', '.join(map(str, setting.choices))}"
        kwargs: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=text if shown else argparse.SUPPRESS)
        if setting.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = setting.type
        (group if shown else parser).add_argument(entry.flag(setting), **kwargs)


def build_parser(description: str, skip=(), help_text: dict[str, str] | None = None,
                 shown_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """One flag per Config field (except ``skip``) and per method setting; ``help_text``
    overrides HELP per field and ``shown_defaults`` the default printed for it (an entry
    point's own default, the dataset's and the method's recipe)."""
    parser = CommandLineParser(description=description, allow_abbrev=False)  # defaults in [brackets]
    parser.add_argument("--config", help="YAML file of config values (flags override it)")
    defaults = Config()
    shown_defaults = shown_defaults or {}
    helps = {**HELP, **(help_text or {})}
    accepted = choices()
    for f in dataclasses.fields(Config):
        if f.name in skip or f.name in NOT_FLAGS:
            continue
        default = shown_defaults.get(f.name, getattr(defaults, f.name))
        if default is None and f.name in AUTO_BOOLEANS:
            default = "auto"
        text = helps.get(f.name, f.name.replace("_", " "))
        allowed = accepted.get(f.name, ())
        if allowed and not all(value in text for value in allowed):
            text += f"; one of: {', '.join(allowed)}"  # from the registries, so never out of date
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{text} [{default}]")
        field_default = getattr(defaults, f.name)
        if isinstance(field_default, bool) or f.name in AUTO_BOOLEANS:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(field_default) if field_default is not None else str
        parser.add_argument(_flag(f.name), **kwargs)
    add_method_flags(parser, shown_defaults.get("method", Config.method), shown_defaults)
    return parser


def read_config_file(config_file: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read --config {config_file}: {error}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {config_file} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(Config)} | set(olmbalance.registry.setting_keys())
    unknown = set(loaded) - known
    if unknown:
        raise UserError(f"--config {config_file} has unknown keys: {', '.join(sorted(unknown))}")
    return loaded


def split_method_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Move prefixed method-setting keys (``pmr_alpha``) out of ``values`` into their own dict."""
    keys = olmbalance.registry.setting_keys()
    settings = dict(values.pop("method_settings", None) or {})
    for key in [k for k in values if k in keys]:
        settings[key] = values.pop(key)
    return settings


def resolve_config(args: argparse.Namespace) -> Config:
    values = dict(vars(args))
    config_file = values.pop("config", None)
    from_file = read_config_file(config_file) if config_file else {}
    # A resumed run starts from the options saved in its checkpoint; flags still override.
    resume = values.get("resume", from_file.get("resume"))
    saved = resumed_options(resume) if resume else {}
    dataset = values.get("dataset", from_file.get("dataset", saved.get("dataset", Config.dataset)))
    spec = get_dataset_spec(dataset)
    method = values.get("method", from_file.get("method", saved.get("method", Config.method)))
    olmbalance.method_entry(method)  # "unknown method ..." before anything else is read
    recipe = values.get("recipe", from_file.get("recipe", saved.get("recipe", Config.recipe)))
    layers = [recipe_defaults(spec, method, recipe), saved, from_file, values]
    settings: dict[str, Any] = {}
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = dict(layer)
        settings.update(split_method_settings(layer))
        merged.update(layer)
    merged.update(dataset=spec.name, method_settings=settings)
    return validate(Config(**merged))


POSITIVE = ("epochs", "batch_size", "heldout_every", "heldout_batch_size", "fps", "image_size",
            "sample_rate", "n_fft", "hop_length", "spec_frames")


def validate_method_settings(cfg: Config) -> None:
    """Every method setting belongs to the chosen method and has a value of its type."""
    entry = olmbalance.method_entry(cfg.method)
    own = entry.keys()
    for key, value in cfg.method_settings.items():
        if key not in own:
            owner = olmbalance.registry.setting_keys().get(key)
            if owner is None:
                raise UserError(f"unknown method setting {key!r}")
            listed = ", ".join(entry.flag(s) for s in entry.settings) or "none"
            raise UserError(f"{owner[0].flag(owner[1])} is a setting of --method {owner[0].name}, not of "
                            f"--method {cfg.method} (its settings: {listed})")
        cfg.method_settings[key] = own[key].coerce(value, cfg.method, entry.flag(own[key]))


def validate(cfg: Config) -> Config:
    """Catch values that would otherwise fail deep inside training with a traceback."""
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
            olmbalance.method_entry(value)  # "unknown method ...", as the other entry paths say it
        if value not in allowed:
            raise UserError(f"{_flag(name)} {value!r} is not one of: {', '.join(allowed)}")
    validate_method_settings(cfg)
    return cfg


def entry_parser(description: str, argv=None, skip=(), help_text: dict[str, str] | None = None,
                 default_dataset: str = "AVDigits") -> argparse.ArgumentParser:
    """An entry point's parser whose --help shows the defaults of the dataset, method and
    recipe that ``argv`` names (or its --config file names; else ``default_dataset``)."""
    import sys

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    early = argparse.ArgumentParser(add_help=False)
    for name in ("--dataset", "--method", "--config", "--recipe"):
        early.add_argument(name)
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
    recipe = known.recipe or from_file.get("recipe") or Config.recipe
    spec = DATASETS.get(str(dataset).lower()) or get_dataset_spec(default_dataset)
    if method not in olmbalance.METHODS:
        method = Config.method  # resolve_config names the unknown method in one sentence
    if recipe not in RECIPES:
        recipe = Config.recipe
    shown = {**recipe_defaults(spec, method, recipe), "dataset": spec.name, "method": method, "recipe": recipe}
    return build_parser(f"{description} Defaults shown are those of --dataset {spec.name} with --method "
                        f"{method} and --recipe {recipe}.", skip=skip, help_text=help_text, shown_defaults=shown)


def resumed_options(resume: str) -> dict[str, Any]:
    from utils.checkpoint import saved_config

    return load_config_dict(saved_config(resume)).to_dict() if resume else {}


def load_config_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run folder or checkpoint, ignoring unknown keys; runs saved
    before methods declared their own settings kept OGM-GE's at the top level."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = dict(values)
    settings = split_method_settings(values)
    return Config(**{k: v for k, v in values.items() if k in names}, method_settings=settings)
