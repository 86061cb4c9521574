"""The late-fusion model on a CUDA device under the speed switches, and OLM training under --amp.

One command, generated inputs at the released CREMA-D sizes (257x188 log-spectrograms, one
3x224x224 frame per clip, batch 64, bilinear fusion, 6 classes), the CREMA-D recipe
(``config.py``: Adam 1e-4, weight decay 2e-4, summed CE):

1. throughput (samples/s) and peak memory of full OLM steps of the training loop (network
   forward/backward, held-out forward, coefficient update, both optimizers) for float32,
   --amp bf16, --amp fp16, --channels-last and bf16 with channels-last;
2. a short OLM training run (``--train-steps`` steps of ``train_step`` with the real method
   and context, fresh generated batches whose classes are learnable) under --amp bf16 and
   --amp fp16: it must complete with finite weights and coefficients and the rate target
   active, or the command fails.

Data loading is left out: this measures the GPU side only.

    python benchmarks/bench_gpu.py --report docs/results/bench-gpu.md
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> (--amp, --channels-last)
    "fp32": ("none", False), "bf16": ("bf16", False), "fp16": ("fp16", False),
    "cl": ("none", True), "bf16+cl": ("bf16", True), "fp16+cl": ("fp16", True),
}
CLASSES = 6
SPECTROGRAM = (257, 188)
FRAME = 224


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="a CUDA device: cuda or cuda:N")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["fp32", "bf16", "fp16", "cl", "bf16+cl"],
                        help="precision / memory-format combinations timed (cl = channels-last)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--heldout-batch-size", type=int, default=32, help="OLM's held-out batch")
    parser.add_argument("--method", default="olm", help="training method (olm includes the held-out forward)")
    parser.add_argument("--fusion", default="bilinear", help="late-fusion head")
    parser.add_argument("--train-steps", type=int, default=40,
                        help="steps of the OLM training run under --amp bf16 and fp16 (0 skips it)")
    parser.add_argument("--reference-steps", type=int, default=10,
                        help="OLM reference window in that run, so the rate target is active after it")
    parser.add_argument("--report", default=None, help="also write the tables to this markdown file")
    return parser.parse_args(argv)


def recipe(amp: str, channels_last: bool, args):
    """The CREMA-D configuration (released recipe) with this run's switches."""
    from config import resolve_config

    return resolve_config(argparse.Namespace(
        dataset="CREMAD", method=args.method, fusion=args.fusion, amp=amp, channels_last=channels_last,
        batch_size=args.batch_size, heldout_batch_size=args.heldout_batch_size, progress=False,
        reference_steps=args.reference_steps, heldout_every=3))


def build(cfg, device, train_size: int):
    """Model, method and step context, as main.py builds them."""
    import torch

    from engines.methods import method_from_config
    from engines.trainer import make_context
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(0)
    model = LateFusionClassifier(CLASSES, fusion=cfg.fusion).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = method_from_config(cfg, model.heads, train_size).to(device)
    method.setup(model)
    return model, method, make_context(cfg, model, method, device)


class GeneratedBatches:
    """Endless batches at the CREMA-D sizes; each class adds its own fixed pattern to the
    noise, so the task is learnable and a training run can show its loss falling."""

    def __init__(self, batch: int, device, seed: int, spectrogram=SPECTROGRAM, frame=FRAME):
        import torch

        self.batch, self.device = batch, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        patterns = torch.Generator(device=device).manual_seed(1234)
        self.audio = torch.randn(CLASSES, 1, *spectrogram, generator=patterns, device=device)
        self.visual = torch.randn(CLASSES, 1, 3, frame, frame, generator=patterns, device=device)

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        labels = torch.randint(CLASSES, (self.batch,), generator=self.generator, device=self.device)
        audio = torch.randn(self.batch, *self.audio.shape[1:], generator=self.generator, device=self.device)
        visual = torch.randn(self.batch, *self.visual.shape[1:], generator=self.generator, device=self.device)
        # Audio carries the class more clearly than vision: the imbalance OLM addresses.
        inputs = {"audio": audio + 0.5 * self.audio[labels], "visual": visual + 0.2 * self.visual[labels]}
        return inputs, labels, 0


def measure(args, variant: str, device) -> dict:
    """Samples/s and peak memory of full OLM steps on one fixed batch."""
    import itertools

    import torch

    from engines.engines_logits_com import DiagnosticMeans, train_step
    from engines.metrics import HeadMetrics

    amp, channels_last = VARIANTS[variant]
    model, method, ctx = build(recipe(amp, channels_last, args), device, train_size=2 * args.batch_size)
    train = next(GeneratedBatches(args.batch_size, device, seed=0))
    heldout_iter = itertools.repeat(next(GeneratedBatches(args.heldout_batch_size, device, seed=1)))
    torch.cuda.reset_peak_memory_stats(device)

    def steps(count):
        for _ in range(count):
            train_step(model, method, train, heldout_iter, ctx, HeadMetrics(method.heads), DiagnosticMeans())

    steps(args.warmup)
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    steps(args.steps)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return {"variant": variant, "samples_per_s": args.steps * args.batch_size / seconds,
            "ms_per_step": 1000 * seconds / args.steps,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}


def training_run(args, amp: str, device) -> dict:
    """``args.train_steps`` OLM steps on fresh generated batches under ``--amp amp``."""
    import torch

    from engines.engines_logits_com import DiagnosticMeans, train_step
    from engines.metrics import HeadMetrics
    from utils.errors import UserError

    cfg = recipe(amp, False, args)
    model, method, ctx = build(cfg, device, train_size=args.reference_steps * args.batch_size)
    train, heldout = GeneratedBatches(args.batch_size, device, seed=2), GeneratedBatches(args.heldout_batch_size, device, seed=3)
    skipped, losses, saturated = 0, [], []
    began = time.perf_counter()
    for _, batch in zip(range(args.train_steps), train):
        scale = ctx.scaler.get_scale() if ctx.scaler else None
        metrics, diagnostics = HeadMetrics(method.heads), DiagnosticMeans()
        train_step(model, method, batch, heldout, ctx, metrics, diagnostics)
        if ctx.scaler and ctx.scaler.get_scale() < scale:
            skipped += 1  # the scaler found inf/NaN gradients and skipped this step
        losses.append(metrics.compute()["fusion"]["loss"])
        saturated.append(diagnostics.means(method.heads).get("saturated"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    weights = [p for p in model.parameters()] + list(method.coefficient_parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in weights)
    coefficients = method.coefficients()
    modulator = getattr(method, "modulator", None)  # OLM's; other methods have no rate target
    rate_active = modulator is None or not modulator.collecting_reference
    if not finite or skipped >= args.train_steps // 2 or not rate_active:
        raise UserError(f"the --amp {amp} OLM run did not train: finite weights {finite}, {skipped} of "
                        f"{args.train_steps} steps skipped by the scaler, rate target active {rate_active}")
    first, last = losses[:5], losses[-5:]
    return {"amp": amp, "steps": args.train_steps, "skipped": skipped, "seconds": seconds,
            "loss_first": sum(first) / len(first), "loss_last": sum(last) / len(last),
            "coefficients": coefficients,
            "scale": ctx.scaler.get_scale() if ctx.scaler else None,
            "saturated": sum(s for s in saturated if s is not None) / max(1, sum(s is not None for s in saturated))}


def throughput_table(rows: list[dict]) -> str:
    baseline = rows[0]["samples_per_s"] if rows else math.nan
    lines = ["| variant | samples/s | ms/step | peak GiB | vs " + (rows[0]["variant"] if rows else "-") + " |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['samples_per_s']:.1f} | {row['ms_per_step']:.1f} | "
                     f"{row['peak_gib']:.2f} | {row['samples_per_s'] / baseline:.2f}x |")
    return "\n".join(lines)


def training_table(runs: list[dict]) -> str:
    lines = ["| --amp | steps | skipped by the scaler | fusion loss, first 5 steps | last 5 steps | "
             "saturated share | coefficients (audio, visual, fusion) | final loss scale | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        coefficients = ", ".join(f"{v:.3f}" for v in run["coefficients"].values())
        scale = f"{run['scale']:g}" if run["scale"] is not None else "-"
        lines.append(f"| {run['amp']} | {run['steps']} | {run['skipped']} | {run['loss_first']:.3f} | "
                     f"{run['loss_last']:.3f} | {run['saturated']:.2f} | {coefficients} | {scale} | {run['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from utils.errors import UserError

    if not torch.cuda.is_available():
        raise UserError("benchmarks/bench_gpu.py measures a CUDA device and this machine has none; "
                        "run it on a GPU machine")
    from utils.device import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda":
        raise UserError(f"--device {args.device}: this benchmark needs a CUDA device (cuda or cuda:N)")
    if not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; this benchmark "
                        "times and trains under bf16")
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    card = torch.cuda.get_device_name(device)
    memory = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    heading = (f"{card} ({memory:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}; "
               f"batch {args.batch_size} (+{args.heldout_batch_size} held-out) at 257x188 spectrograms and "
               f"224x224 frames, {args.method}/{args.fusion}, 6 classes, CREMA-D recipe")
    print(heading, flush=True)
    rows = []
    for variant in args.variants:
        rows.append(measure(args, variant, device))
        print(f"  {variant}: {rows[-1]['samples_per_s']:.1f} samples/s, {rows[-1]['peak_gib']:.2f} GiB", flush=True)
        torch.cuda.empty_cache()
    runs = []
    for amp in ("bf16", "fp16") if args.train_steps > 0 else ():
        runs.append(training_run(args, amp, device))
        print(f"  OLM --amp {amp}: {runs[-1]['steps']} steps, {runs[-1]['skipped']} skipped, fusion loss "
              f"{runs[-1]['loss_first']:.3f} -> {runs[-1]['loss_last']:.3f}", flush=True)
        torch.cuda.empty_cache()
    body = (f"{heading}.\n\nThroughput of full OLM training steps ({args.steps} timed after {args.warmup} "
            f"warm-up steps, one fixed batch; data loading excluded):\n\n{throughput_table(rows)}\n")
    if runs:
        body += (f"\nShort OLM training runs ({args.train_steps} steps, fresh generated batches with "
                 f"learnable classes, reference window {args.reference_steps} steps, then the rate target):"
                 f"\n\n{training_table(runs)}\n")
    print("\n" + body)
    if args.report:
        from utils.provenance import write_report

        print(f"report: {write_report(args.report, body)}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
