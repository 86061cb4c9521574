"""OLM's training-step cost over joint training, measured alternately in one process.

Both methods train the same architecture on the same batches (AV-Digits defaults unless flags
say otherwise); rounds alternate joint / olm so machine noise hits both alike. Prints the median
step time of each and their ratio. Example:

    python benchmarks/bench_olm_overhead.py --rounds 6 --steps 5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per method")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="main.py flags after '--' (e.g. -- --dataset AVDigits --heldout-every 2)")
    return parser.parse_args(argv)


def build(cfg, method_name, data, device):
    import torch

    from engines.methods import method_from_config
    from engines.trainer import make_context, make_loaders
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(cfg.seed)  # same initial weights for both methods
    model = LateFusionClassifier(len(data.class_names), data.modalities, cfg.fusion).to(device)
    method = method_from_config(dataclasses.replace(cfg, method=method_name), model.heads, len(data.train)).to(device)
    method.setup(model)
    loaders = make_loaders(cfg, data, device, method.needs_heldout)
    return model, method, make_context(cfg, model, method, device), loaders


def main(argv=None) -> None:
    import torch

    from config import build_parser, get_dataset_spec, resolve_config
    from datasets.builders import build_data
    from engines.engines_logits_com import DiagnosticMeans, cycle, train_step
    from engines.metrics import HeadMetrics
    from utils.device import resolve_device

    args = parse_args(argv)
    flags = [f for f in args.flags if f != "--"]
    cfg = resolve_config(build_parser("bench").parse_args(flags + ["--no-progress"]))
    device = resolve_device(cfg.device)
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    # Pre-load one epoch's worth of batches so data loading is not part of the step time.
    runs = {name: build(cfg, name, data, device) for name in ("joint", "olm")}
    batches = [b for _, b in zip(range(args.steps), runs["joint"][3].train)]
    heldout = {name: cycle(run[3].heldout) if run[3].heldout is not None else None for name, run in runs.items()}
    times = {name: [] for name in runs}

    def steps(name, count):
        model, method, ctx, _ = runs[name]
        model.train()
        for i in range(count):
            train_step(model, method, batches[i % len(batches)], heldout[name], ctx,
                       HeadMetrics(method.heads), DiagnosticMeans())
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in runs:
        steps(name, args.warmup)
    for _ in range(args.rounds):
        for name in runs:
            began = time.perf_counter()
            steps(name, args.steps)
            times[name].append((time.perf_counter() - began) / args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"device {device}, dataset {cfg.dataset}, batch {cfg.batch_size}, heldout batch "
          f"{cfg.heldout_batch_size} every {cfg.heldout_every} step(s), torch threads {torch.get_num_threads()}")
    for name, median in medians.items():
        print(f"{name:6s} median step {median * 1000:8.1f} ms  (rounds: "
              + ", ".join(f"{t * 1000:.0f}" for t in times[name]) + ")")
    print(f"olm / joint step time: {medians['olm'] / medians['joint']:.3f}")


if __name__ == "__main__":
    main()
