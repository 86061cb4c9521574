"""Train a mid-fusion transformer (EMT, MBT, UMT or CA) with OLM or a baseline, with k-fold
cross-validation on the train pool; see docs/olm_trans.md and --help.

Example: python main_trans.py --model-type emt --method olm --device cpu --out runs/trans-emt
(the default dataset, AVDigitsFeatures, is built from the embedded AV-Digits: no download).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config import LATE_FUSION_FIELDS, entry_parser, get_dataset_spec, resolve_config
from utils.cli import run_cli, run_on_every_rank
from utils.errors import UserError

DEFAULT_DATASET = "AVDigitsFeatures"
TRANS_HELP = {
    "dataset": f"feature dataset: {DEFAULT_DATASET} (embedded, no download) or MERMULTI",
    "data_root": "dataset root holding features/<name>/<sample>.npy and labels.csv "
                 "(default: $OLM_<NAME>_ROOT, else $OLM_DATA_ROOT/<NAME>)",
    "model_type": "mid-fusion transformer: emt, mbt, umt or ca",
    "modalities": "comma-separated modalities, one head each plus fusion: audio,visual or audio,visual,text",
    "d_model": "transformer width", "num_layers": "fusion layers", "num_heads": "attention heads",
    "num_bottleneck": "bottleneck tokens (MBT) or pivot tokens (EMT, UMT); unused by CA",
    "dropout": "dropout in the transformer layers",
    "dim_feedforward": "hidden width of the feed-forward blocks (0: the released width for the model "
                       "type scaled to --d-model: EMT 4/3 x d_model, MBT/UMT/CA 8/3 x d_model)",
    "selection_metric": "validation metric of the selection head that picks each fold's best epoch: "
                        "f1_weighted (MER2023's emotion metric) or acc",
    "folds": "cross-validation folds of the train pool",
    "max_folds": "train only the first N folds (0: all), for quick runs",
    "fold_seed": "seed of the stratified fold assignment (kept apart from --seed)",
    "label_file": "labels: a CSV name,emo,val,split, or the released label-6way.npz; an .npz is "
                  "read with pickle (it can run code), so it is read only when named here "
                  "(default: <root>/labels.csv)",
    "audio_feature": "folder under <root>/features/ with the audio features",
    "visual_feature": "folder under <root>/features/ with the visual features",
    "text_feature": "folder under <root>/features/ with the text features",
    "feature_dim": "width D every feature file must have (0: the most common width per modality)",
    "cpu_threads": "torch threads when training on the CPU (0: torch's default)",
    "out": "cross-validation folder: cv_results.json, folds.json, fold<k>/ run folders",
    "resume": "continue an interrupted cross-validation folder with the options it was started with "
              "(its config.yaml); finished folds are kept; flags that change what is trained are refused",
}


def make_parser(argv=None) -> argparse.ArgumentParser:
    return entry_parser("Train a mid-fusion transformer with OLM or a baseline, with k-fold "
                        "cross-validation (OLM-Trans).", argv, skip=LATE_FUSION_FIELDS, help_text=TRANS_HELP,
                        default_dataset=DEFAULT_DATASET)


def dataset_named(args: argparse.Namespace) -> bool:
    """Whether --dataset or the --config file names a dataset (else the embedded one is used)."""
    if "dataset" in vars(args):
        return True
    if getattr(args, "config", None):
        import yaml

        try:
            values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return False  # resolve_config reports the unreadable file
        return isinstance(values, dict) and "dataset" in values
    return False


def given_options(args: argparse.Namespace) -> dict:
    """The options the user set: flags, and the --config file's values beneath them."""
    given = {k: v for k, v in vars(args).items() if k != "config"}
    if getattr(args, "config", None):
        import yaml

        try:
            from_file = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"cannot read --config {args.config}: {error}") from None
        given = {**from_file, **given} if isinstance(from_file, dict) else given
    return given


def resumed_config(args: argparse.Namespace):
    """--resume of a cross-validation folder: its saved options, for the folds done and those
    to come; a flag that would change what is trained is one sentence, never a silent mix."""
    import dataclasses

    from config import Config, validate
    from engines.cross_validation import refuse_conflicts, saved_options

    saved = saved_options(args.resume)
    given = given_options(args)
    if "dataset" in given:  # compare the canonical spelling
        given["dataset"] = get_dataset_spec(str(given["dataset"])).name
    refuse_conflicts(args.resume, saved, given, "this cross-validation folder")
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in {**saved, **given}.items() if k in known}
    return validate(Config(**values))


def parse_config(argv=None):
    from engines.cross_validation import is_cv_folder

    args = make_parser(argv).parse_args(argv if argv is None else [str(a) for a in argv])
    if is_cv_folder(getattr(args, "resume", None)):
        return resumed_config(args)
    if not dataset_named(args):
        args.dataset = DEFAULT_DATASET
    return resolve_config(args)


def check_model_flags(cfg) -> None:
    from models.transformers.build import TRANSFORMER_TYPES

    if cfg.model_type.lower() not in TRANSFORMER_TYPES:
        raise UserError(f"--model-type {cfg.model_type!r} is unknown; choose one of {', '.join(TRANSFORMER_TYPES)}")
    for flag, value in (("d-model", cfg.d_model), ("num-layers", cfg.num_layers),
                        ("num-heads", cfg.num_heads), ("num-bottleneck", cfg.num_bottleneck)):
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if cfg.d_model % cfg.num_heads:
        raise UserError(f"--d-model {cfg.d_model} must be divisible by --num-heads {cfg.num_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.dim_feedforward < 0:
        raise UserError(f"--dim-feedforward must be 0 (the released width) or positive, got {cfg.dim_feedforward}")


def build_model(cfg, data):
    from models.transformers.build import build_transformer

    return build_transformer(cfg.model_type, data.modalities, data.input_dims, len(data.class_names),
                             d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                             num_bottleneck=cfg.num_bottleneck, dropout=cfg.dropout,
                             dim_feedforward=cfg.dim_feedforward or None,
                             # MER2023's valence regression, when every train-pool label carries one
                             predict_valence=data.pool.has_valence)


def run(cfg) -> dict:
    """Build the feature data and run the cross-validation; return cv_results.json's content."""
    from datasets.builders import build_data
    from datasets.mer import parse_modalities
    from engines.cross_validation import output_dir, run_cross_validation
    from olmbalance import build_method
    from utils.device import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    spec = get_dataset_spec(cfg.dataset)
    if spec.kind != "mer":
        raise UserError(f"--dataset {spec.name} is an audio-visual clip dataset for late fusion; "
                        "run main.py (scripts/run_logits_com.sh) instead")
    check_model_flags(cfg)
    modalities = parse_modalities(cfg.modalities)
    build_method(cfg.method, modalities + ("fusion",))  # fail fast on a bad method name
    out_dir = output_dir(cfg, f"{spec.name}-{cfg.model_type}-{cfg.method}-s{cfg.seed}")
    data = build_data(cfg, spec)
    # A method that cannot drive this model (e.g. one needing late-fusion read-outs) must stop
    # the run before the cross-validation folder is created.
    build_method(cfg.method, modalities + ("fusion",)).setup(build_model(cfg, data))
    results = run_cross_validation(cfg, data, device, out_dir, lambda: build_model(cfg, data))
    from utils import distributed
    from utils.checkpoint import prune_checkpoints

    if distributed.is_main():  # every fold is scored from its best.pt by now
        for fold in results.get("per_fold", []):
            prune_checkpoints(fold["run_dir"], cfg.keep_checkpoints)
    return results


def main(argv=None) -> None:
    cfg = parse_config(argv)
    results = run_on_every_rank(cfg, run)
    if results is not None:
        from engines.cross_validation import cv_table
        from utils.plot import plot_run

        print(cv_table(results))
        print(f"cross-validation folder: {results['run_dir']}")
        if cfg.plots:
            for fold in results["per_fold"]:
                plot_run(fold["run_dir"])


if __name__ == "__main__":
    run_cli(main)
