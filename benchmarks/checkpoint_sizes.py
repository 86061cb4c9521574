"""Sizes of best.pt (weights, options, metrics) and last.pt (the whole training state) per
dataset's default model, measured by writing both kinds with the trainer's own payload
functions (no training: one zero-gradient Adam step fills the optimizer state). Examples:

    python benchmarks/checkpoint_sizes.py
    python benchmarks/checkpoint_sizes.py --datasets AVDigits CREMAD --report docs/results/checkpoint-sizes.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_DATASETS = ("AVDigits", "CREMAD", "AVE", "KineticSound", "VGGSound")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                        help="late-fusion datasets to size, each with its registered defaults")
    parser.add_argument("--method", default="olm", help="method whose state last.pt carries [olm]")
    parser.add_argument("--report", help="also write the table to this markdown file")
    return parser.parse_args(argv)


def sizes(dataset: str, method_name: str) -> tuple[int, int, int, str]:
    """(parameters, best.pt bytes, last.pt bytes, model) for ``dataset``'s default model."""
    import torch

    from config import Config, get_dataset_spec, validate
    from olmbalance import build_method
    from engines.trainer import Loaders, checkpoint_payload, inference_payload, make_context
    from models.encoders import late_fusion_model
    from utils.checkpoint import save_atomic

    spec = get_dataset_spec(dataset)
    cfg = validate(Config(**{**spec.defaults, "dataset": spec.name, "method": method_name, "device": "cpu"}))
    model = late_fusion_model(cfg, spec.classes, ("audio", "visual"))  # what main.py builds
    method = build_method(method_name, model.heads)
    method.setup(model)
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    for optimizer in (ctx.network_optimizer, ctx.coefficient_optimizer):
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # creates Adam's two moment buffers per parameter, as training would
    metrics = {h: {"acc": 0.0, "f1": 0.0, "loss": 0.0, "norm": 0.0} for h in model.heads}
    best = {"epoch": 1, "val_acc": 0.0, "val": metrics, "test": metrics, "coefficients": method.coefficients()}
    loaders = Loaders(None, None, None, None, {"train": torch.Generator(), "heldout": torch.Generator()})
    with tempfile.TemporaryDirectory() as folder:
        save_atomic(inference_payload(cfg, model, 1, best, [str(c) for c in range(spec.classes)]),
                    Path(folder) / "best.pt")
        save_atomic(checkpoint_payload(cfg, model, method, ctx, None, loaders, 1, best, 0), Path(folder) / "last.pt")
        best_size, last_size = ((Path(folder) / name).stat().st_size for name in ("best.pt", "last.pt"))
    model_name = f"{getattr(cfg, 'encoder', 'resnet18')} + {cfg.fusion}"
    return sum(p.numel() for p in model.parameters()), best_size, last_size, model_name


def table(rows) -> str:
    lines = ["| dataset | encoders + fusion | parameters | best.pt | last.pt | best / last |", "|---|---|---|---|---|---|"]
    for dataset, (params, best, last, fusion) in rows:
        lines.append(f"| {dataset} | {fusion} | {params / 1e6:.1f}M | {best / 2**20:.1f} MiB | "
                     f"{last / 2**20:.1f} MiB | {best / last:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [(name, sizes(name, args.method)) for name in args.datasets]
    body = (f"Checkpoint sizes of each dataset's default model, method `{args.method}` "
            "(`benchmarks/checkpoint_sizes.py`; MiB = 2^20 bytes).\n\n" + table(rows))
    print(body)
    if args.report:
        from utils.provenance import write_report

        print(f"wrote {write_report(args.report, body)}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
