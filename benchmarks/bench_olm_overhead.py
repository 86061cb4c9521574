"""Training-step cost of OLM (or any method) over joint training, measured alternately in one process.

Every method trains the same architecture from the same initial weights on the same pre-loaded
batches (AV-Digits defaults unless main.py flags after ``--`` say otherwise). In each round,
every method trains one block of steps right next to a block of the baseline (in alternating
order), and the round's ratio is taken between those two adjacent blocks: machine noise (which
on a shared 2-core VM moves step times by 20% within seconds) then hits both alike. A block
spans a whole number of held-out cadences, so every block of a method holds the same number
of held-out forwards, and the untimed warm-up runs past OLM's reference window (whose tail
measures a fresh held-out batch every step, a one-off cost per run). The figure reported is
the median over rounds of the ratios (with their interquartile range), beside the median
step times; ``--report`` also writes them to a markdown file headed by the command, date, CPU
model and load (utils/provenance.py). Examples:

    python benchmarks/bench_olm_overhead.py --rounds 60
    python benchmarks/bench_olm_overhead.py --methods olm ogm_ge fusion_only \\
        --report docs/results/bench-step-time.md -- --heldout-every 8
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="joint", help="method every other one is divided by")
    parser.add_argument("--methods", nargs="+", default=["olm"], help="methods timed against the baseline")
    parser.add_argument("--rounds", type=int, default=60, help="alternating rounds per method")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per block (default: --heldout-every, at least 8); "
                             "a multiple of --heldout-every keeps the held-out forwards per block equal")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps per method first (OLM methods: at least through the "
                             "reference window, one epoch by default)")
    parser.add_argument("--epoch", type=int, default=3,
                        help="the epoch the timed steps belong to: every method's start_epoch runs for epochs "
                             "1..EPOCH first, so warm-up epochs (OPM, modality valuation, Greedy) are past")
    parser.add_argument("--report", help="also write the figures to this markdown file (e.g. "
                                         "docs/results/bench-step-time.md)")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="main.py flags after '--' (e.g. -- --dataset AVDigits --heldout-every 2)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def build(cfg, method_name, data, device):
    import torch

    from engines.methods import model_and_method
    from engines.trainer import make_context, make_loaders

    torch.manual_seed(cfg.seed)  # same initial weights for every method
    model, method = model_and_method(dataclasses.replace(cfg, method=method_name), len(data.class_names),
                                     data.modalities, len(data.train), device)
    loaders = make_loaders(cfg, data, device, method.needs_heldout)
    return model, method, make_context(cfg, model, method, device), loaders


def quartiles(values) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q1, median, q3


def render(cfg, device, threads, names, baseline, times, ratios, steps, epoch_work, epoch_steps) -> str:
    rounds, last = len(times[names[-1]]), len(epoch_work[baseline])
    lines = [f"{rounds} rounds; in each, every method trains a block of {steps} steps next to a block of "
             f"{baseline} (alternating order). {cfg.dataset} defaults: encoder {cfg.encoder}, batch {cfg.batch_size}, "
             f"held-out batch {cfg.heldout_batch_size} every {cfg.heldout_every} step(s) "
             f"({cfg.heldout_norm} statistics); device {device}, torch threads {threads}. "
             f"'over {baseline}' is the median over rounds of the ratio between the two adjacent "
             f"blocks (interquartile range in brackets). The steps are epoch {last}'s: each method's "
             f"start_epoch ran for epochs 1..{last} first, so warm-up epochs are past. 'work before "
             "epoch k' is the time of start_epoch(k) (teachers, prototypes, copies, valuations: work on "
             "train/val data besides the steps; a method repeats it on its own schedule, see its "
             f"docstring), in seconds and as a share of one epoch of {baseline} steps ({epoch_steps} "
             "steps at its median step time; data loading not counted).", "",
             f"| method | median step (ms) | over {baseline} | work before epoch 1 (s, share) | "
             f"work before epoch {last} (s, share) |", "|---|---|---|---|---|"]
    epoch = statistics.median(times[baseline]) * epoch_steps

    def work(name):
        first, final = epoch_work[name][0], epoch_work[name][-1]
        return f"{first:.2f} ({first / epoch:.2f}) | {final:.2f} ({final / epoch:.2f})"

    lines.append(f"| {baseline} | {statistics.median(times[baseline]) * 1000:.1f} | 1 | {work(baseline)} |")
    for name in names[1:]:
        q1, median, q3 = quartiles(ratios[name])
        lines.append(f"| {name} | {statistics.median(times[name]) * 1000:.1f} | "
                     f"{median:.3f} [{q1:.3f}, {q3:.3f}] | {work(name)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import torch

    from config import build_parser, get_dataset_spec, resolve_config
    from datasets.builders import build_data
    from engines.engines_logits_com import DiagnosticMeans, cycle, to_device, train_step
    from engines.epoch_data import LoaderEpochData
    from engines.metrics import HeadMetrics
    from utils.device import resolve_device

    args = parse_args(argv)
    flags = [f for f in args.flags if f != "--"]
    cfg = resolve_config(build_parser("bench").parse_args(flags + ["--no-progress"]))
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)  # as main.py does (AV-Digits: one thread)
    steps_per_block = args.steps or cfg.heldout_every * math.ceil(8 / cfg.heldout_every)
    if steps_per_block % cfg.heldout_every:
        print(f"warning: --steps {steps_per_block} is not a multiple of --heldout-every {cfg.heldout_every}; "
              "blocks will hold different numbers of held-out forwards", file=sys.stderr)
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    names = list(dict.fromkeys([args.baseline, *args.methods]))
    runs = {name: build(cfg, name, data, device) for name in names}
    # Pre-loaded training and held-out batches, so data loading (done by loader workers in a
    # real run) is not part of the step time.
    batches = [b for _, b in zip(range(steps_per_block), runs[args.baseline][3].train)]
    heldout = {name: itertools.cycle([b for _, b in zip(range(steps_per_block), cycle(run[3].heldout))])
               if run[3].heldout is not None else None for name, run in runs.items()}
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}

    def steps(name, count):
        model, method, ctx, _ = runs[name]
        model.train()
        for i in range(count):
            train_step(model, method, batches[i % len(batches)], heldout[name], ctx,
                       HeadMetrics(method.heads), DiagnosticMeans())
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The work before an epoch's steps (teachers, prototypes, copies, valuations), for epochs
    # 1..--epoch, timed: what a method costs besides its steps; the steps then belong to that epoch.
    epoch_work = {name: [] for name in names}
    for name in names:
        model, method, ctx, loaders = runs[name]
        for epoch in range(1, args.epoch + 1):
            began = time.perf_counter()
            method.start_epoch(epoch, model, LoaderEpochData(loaders.train, loaders.val, device, cfg.seed, epoch,
                                                             lambda inputs: to_device(inputs, ctx)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_work[name].append(time.perf_counter() - began)
            model.train()
    for name in names:
        method = runs[name][1]
        reference = getattr(getattr(method, "modulator", None), "reference_steps", 0)
        steps(name, max(args.warmup, reference))
    for round_ in range(args.rounds):
        for index, name in enumerate(names[1:]):
            # The baseline's block right next to this method's, first or second in turn.
            pair = (args.baseline, name) if (round_ + index) % 2 == 0 else (name, args.baseline)
            block = {}
            for member in pair:
                began = time.perf_counter()
                steps(member, steps_per_block)
                block[member] = (time.perf_counter() - began) / steps_per_block
                times[member].append(block[member])
            ratios[name].append(block[name] / block[args.baseline])
    for name in names:
        print(f"{name:14s} median step {statistics.median(times[name]) * 1000:8.1f} ms  (rounds: "
              + ", ".join(f"{t * 1000:.0f}" for t in times[name]) + ")")
    epoch_steps = len(runs[args.baseline][3].train)
    body = render(cfg, device, torch.get_num_threads(), names, args.baseline, times, ratios, steps_per_block,
                  epoch_work, epoch_steps)
    print(body)
    if args.report:
        from utils.provenance import write_report

        print(f"wrote {write_report(args.report, body)}")


if __name__ == "__main__":
    main()
