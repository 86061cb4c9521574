"""Training-step cost of OLM (or any method) over joint training, measured alternately in one process.

Every method trains the same architecture from the same initial weights on the same pre-loaded
batches (AV-Digits defaults unless main.py flags after ``--`` say otherwise); rounds alternate
the methods so machine noise hits them alike. Prints each method's median step time and its
ratio to the baseline's; ``--report`` also writes them to a markdown file headed by the
command, date, CPU model and load (utils/provenance.py). Examples:

    OMP_NUM_THREADS=1 python benchmarks/bench_olm_overhead.py --rounds 10 --steps 20
    python benchmarks/bench_olm_overhead.py --methods olm ogm_ge fusion_only \\
        --report docs/results/bench-step-time.md -- --heldout-every 8
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="joint", help="method every other one is divided by")
    parser.add_argument("--methods", nargs="+", default=["olm"], help="methods timed against the baseline")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per method")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    parser.add_argument("--report", help="also write the figures to this markdown file (e.g. "
                                         "docs/results/bench-step-time.md)")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="main.py flags after '--' (e.g. -- --dataset AVDigits --heldout-every 2)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def build(cfg, method_name, data, device):
    import torch

    from engines.methods import method_from_config
    from engines.trainer import make_context, make_loaders
    from models.encoders import late_fusion_model

    torch.manual_seed(cfg.seed)  # same initial weights for every method
    model = late_fusion_model(cfg, len(data.class_names), data.modalities).to(device)
    method = method_from_config(dataclasses.replace(cfg, method=method_name), model.heads, len(data.train)).to(device)
    method.setup(model)
    loaders = make_loaders(cfg, data, device, method.needs_heldout)
    return model, method, make_context(cfg, model, method, device), loaders


def render(cfg, device, threads, names, baseline, times, medians, steps) -> str:
    lines = [f"Median training-step time per method over {len(times[baseline])} alternating rounds of "
             f"{steps} steps; {cfg.dataset} defaults: encoder {cfg.encoder}, batch {cfg.batch_size}, "
             f"held-out batch {cfg.heldout_batch_size} every {cfg.heldout_every} step(s) "
             f"({cfg.heldout_norm} statistics); device {device}, torch threads {threads}.", "",
             f"| method | median step (ms) | over {baseline} |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {medians[name] * 1000:.1f} | {medians[name] / medians[baseline]:.3f} |")
    return "\n".join(lines) + "\n"


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
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)  # as main.py does (AV-Digits: one thread)
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    names = list(dict.fromkeys([args.baseline, *args.methods]))
    runs = {name: build(cfg, name, data, device) for name in names}
    # Pre-loaded training and held-out batches, so data loading (done by loader workers in a
    # real run) is not part of the step time.
    batches = [b for _, b in zip(range(args.steps), runs[args.baseline][3].train)]
    heldout = {name: itertools.cycle([b for _, b in zip(range(args.steps), cycle(run[3].heldout))])
               if run[3].heldout is not None else None for name, run in runs.items()}
    times = {name: [] for name in names}

    def steps(name, count):
        model, method, ctx, _ = runs[name]
        model.train()
        for i in range(count):
            train_step(model, method, batches[i % len(batches)], heldout[name], ctx,
                       HeadMetrics(method.heads), DiagnosticMeans())
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in names:
        steps(name, args.warmup)
    for round_ in range(args.rounds):
        # Alternate the order too, so neither method always runs right after the other.
        for name in names if round_ % 2 == 0 else reversed(names):
            began = time.perf_counter()
            steps(name, args.steps)
            times[name].append((time.perf_counter() - began) / args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name in names:
        print(f"{name:14s} median step {medians[name] * 1000:8.1f} ms  (rounds: "
              + ", ".join(f"{t * 1000:.0f}" for t in times[name]) + ")")
    body = render(cfg, device, torch.get_num_threads(), names, args.baseline, times, medians, args.steps)
    print(body)
    if args.report:
        from utils.provenance import write_report

        print(f"wrote {write_report(args.report, body)}")


if __name__ == "__main__":
    main()
