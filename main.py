"""Train an audio-visual late-fusion model with OLM or a baseline; see README and --help.

Example: python main.py --dataset AVDigits --method olm --fusion bilinear --epochs 10 --device cpu
"""
from __future__ import annotations

import torch

from config import MID_FUSION_FIELDS, entry_parser, get_dataset_spec, resolve_config
from utils.cli import run_cli, run_on_every_rank


def run(cfg) -> dict:
    """Build data, model and method from ``cfg``, train, and return results.json's content."""
    from datasets.builders import build_data
    from engines.methods import model_and_method
    from olmbalance import method_entry
    from engines.trainer import fit, make_loaders
    from utils import distributed
    from utils.checkpoint import prune_checkpoints
    from utils.device import resolve_device
    from utils.run_dir import prepare_run_dir
    from utils.seed import seed_everything

    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        # AV-Digits: one compute thread beside one loader worker beats two threads fighting it.
        torch.set_num_threads(cfg.cpu_threads)
    spec = get_dataset_spec(cfg.dataset)
    if spec.kind != "av":
        raise_wrong_entry(spec.name)
    method_entry(cfg.method)  # before any data is materialized or loaded
    data = build_data(cfg, spec)
    seed_everything(cfg.seed)
    model, method = model_and_method(cfg, len(data.class_names), data.modalities, len(data.train), device)
    loaders = make_loaders(cfg, data, device, method.needs_heldout)
    run_dir = prepare_run_dir(cfg, f"{spec.name}-{cfg.method}-{cfg.fusion}-s{cfg.seed}")
    # fit() wraps the model in DDP under torchrun (it knows which parameters the method trains).
    results = fit(cfg, model, method, loaders, run_dir, device,
                  extra_results={"classes": data.class_names, "run_dir": str(run_dir)})
    if distributed.is_main():
        if cfg.imbalance:  # before pruning: they read best.pt
            from engines.imbalance import diagnose_run
            from utils.run_logging import write_json

            results["imbalance"] = diagnose_run(run_dir, model, data, cfg, device, results["selection_head"],
                                                predict=method.forward_eval)
            write_json(run_dir / "results.json", results)
        prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return results


def raise_wrong_entry(name: str):
    from utils.errors import UserError

    raise UserError(f"--dataset {name} holds feature sequences for the transformers; "
                    "run main_trans.py (scripts/run_trans_logits_com.sh) instead")


def main(argv=None) -> None:
    parser = entry_parser("Train a late-fusion audio-visual model with OLM or a baseline.", argv,
                          skip=MID_FUSION_FIELDS)
    cfg = resolve_config(parser.parse_args(argv if argv is None else [str(a) for a in argv]))
    results = run_on_every_rank(cfg, run)
    if results is not None:
        from utils.report import summary_table

        print(summary_table(results))
        print(f"run folder: {results['run_dir']}")
        if cfg.plots:
            from utils.plot import plot_run

            print(f"figure: {plot_run(results['run_dir'])}")


if __name__ == "__main__":
    run_cli(main)
