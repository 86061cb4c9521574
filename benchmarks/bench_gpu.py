"""Training throughput of the late-fusion model on a CUDA device under the speed switches.

Runs full OLM steps of the training loop (network forward/backward, held-out forward, the
coefficient update, both optimizers) on random tensors at the released CREMA-D input sizes:
257x188 log-spectrograms, one 3x224x224 frame per clip, batch 64, bilinear fusion, 6 classes.
Reports samples/s and peak memory for float32, --amp bf16, --channels-last and both (add
fp16 with --variants). Data loading is left out: this measures the GPU side only.

    python benchmarks/bench_gpu.py                      # all four variants, 30 timed steps each
    python benchmarks/bench_gpu.py --steps 50 --variants fp32 bf16 fp16 bf16+cl
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> (--amp, --channels-last)
    "fp32": ("none", False), "bf16": ("bf16", False), "fp16": ("fp16", False),
    "cl": ("none", True), "bf16+cl": ("bf16", True), "fp16+cl": ("fp16", True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="a CUDA device: cuda or cuda:N")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["fp32", "bf16", "cl", "bf16+cl"],
                        help="precision / memory-format combinations (cl = channels-last)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--heldout-batch-size", type=int, default=32, help="OLM's held-out batch")
    parser.add_argument("--method", default="olm", help="training method (olm includes the held-out forward)")
    parser.add_argument("--fusion", default="bilinear", help="late-fusion head")
    return parser.parse_args(argv)


def random_batch(batch: int, device, classes: int = 6):
    import torch

    inputs = {"audio": torch.randn(batch, 1, 257, 188, device=device),
              "visual": torch.randn(batch, 1, 3, 224, 224, device=device)}
    return inputs, torch.randint(classes, (batch,), device=device), 0


def measure(args, variant: str, device) -> dict:
    import torch

    from config import Config
    from engines.engines_logits_com import DiagnosticMeans, train_step
    from engines.methods import build_method
    from engines.metrics import HeadMetrics
    from engines.trainer import make_context
    from models.late_fusion import LateFusionClassifier

    amp, channels_last = VARIANTS[variant]
    torch.manual_seed(0)
    model = LateFusionClassifier(6, fusion=args.fusion).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = build_method(args.method, model.heads, reference_steps=2).to(device)
    method.setup(model)
    cfg = Config(amp=amp, channels_last=channels_last, progress=False, lr=1e-4)
    ctx = make_context(cfg, model, method, device)
    train, heldout = random_batch(args.batch_size, device), random_batch(args.heldout_batch_size, device)
    heldout_iter = itertools.repeat(heldout)
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
    if any(VARIANTS[v][0] == "bf16" for v in args.variants) and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; drop the bf16 variants")
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch_size} "
          f"(+{args.heldout_batch_size} held-out), {args.method}/{args.fusion}, {args.steps} steps after {args.warmup}")
    print(f"{'variant':<10}{'samples/s':>11}{'ms/step':>10}{'peak GiB':>10}{'speed-up':>10}")
    baseline = None
    for variant in args.variants:
        row = measure(args, variant, device)
        baseline = baseline or row["samples_per_s"]
        print(f"{row['variant']:<10}{row['samples_per_s']:>11.1f}{row['ms_per_step']:>10.1f}"
              f"{row['peak_gib']:>10.2f}{row['samples_per_s'] / baseline:>9.2f}x", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
