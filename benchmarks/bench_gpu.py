"""The CUDA training path at the released CREMA-D sizes: the step under each speed switch, OLM
under --amp, and an epoch of main.py against compute alone on the same batches.

One command, the CREMA-D recipe (``config.py``: ResNet18, bilinear fusion, batch 64, Adam 1e-4,
weight decay 2e-4, summed CE, a held-out batch of 64 every step):

1. throughput (samples/s), peak memory and host synchronizations per step of full OLM steps
   of the training loop (network forward/backward, held-out forward, coefficient update, both
   optimizers) on generated 257x188 spectrograms and 224x224 frames, for each ``--variants``
   entry: precision (fp32, bf16, fp16), memory format (channels-last is the CUDA default;
   ``-nchw`` turns it off) and ``+compile`` (``--compile``, torch.compile of the model);
2. a short OLM training run under --amp bf16 and --amp fp16 (``--train-steps`` steps, fresh
   generated batches whose classes are learnable): it must end with finite weights and
   coefficients and the rate target active, or the command fails;
3. ``--epochs`` epochs of ``main.py`` on a generated CREMA-D-sized fixture (``--clips`` clips
   at the released sizes, ``--workers`` loader workers: the machine's cores by default), each
   epoch's wall time beside compute alone (the same number of training steps and evaluation
   samples on batches already on the device), with the GPU's utilization and peak memory.

Without a CUDA device it runs its CPU part: every path above at small sizes on the CPU (a
check that they run, not a measurement; ``--compile`` through the aot_eager backend), the
host reads per step counted, and it says what it did not measure. ``--report`` is written
only from a CUDA run.

    python benchmarks/bench_gpu.py --report docs/results/bench-gpu.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> (--amp, channels-last, --compile)
    "fp32-nchw": ("none", False, False), "fp32": ("none", True, False), "bf16": ("bf16", True, False),
    "fp16": ("fp16", True, False), "bf16-nchw": ("bf16", False, False),
    "fp32+compile": ("none", True, True), "bf16+compile": ("bf16", True, True),
}
DEFAULT_VARIANTS = ["fp32-nchw", "fp32", "bf16", "fp16", "fp32+compile", "bf16+compile"]
CLASSES = 6
RELEASED = {"spectrogram": (257, 188), "frame": 224, "main_flags": []}
# The CPU part: every path at sizes a CPU runs in seconds (main.py gets the matching recipe).
SMALL = {"spectrogram": (32, 16), "frame": 16,
         "main_flags": ["--image-size", "16", "--n-fft", "62", "--hop-length", "250", "--spec-frames", "16",
                        "--heldout-batch-size", "8"]}
NOT_MEASURED_ON_CPU = (
    "samples/s of the step on a GPU under fp32, bf16, fp16, channels-last and --compile (the bf16/fp32 ratio)",
    "host synchronizations per step as CUDA counts them (torch.cuda.set_sync_debug_mode)",
    "an epoch of main.py at the released sizes against compute alone, GPU utilization and peak memory",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default=None, help="a CUDA device (cuda, cuda:N); default: cuda when "
                        "there is one, else the CPU part")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                        help="precision / memory format / compile combinations timed")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning, compilation)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--method", default="olm", help="training method (olm includes the held-out forward)")
    parser.add_argument("--train-steps", type=int, default=40,
                        help="steps of the OLM training run under --amp bf16 and fp16 (0 skips it)")
    parser.add_argument("--reference-steps", type=int, default=10,
                        help="OLM reference window in that run, so the rate target is active after it")
    parser.add_argument("--clips", type=int, default=2000, help="clips of the main.py fixture (0 skips the epochs)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of main.py (the first fills the "
                        "spectrogram cache)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="main.py loader workers")
    parser.add_argument("--e2e-amp", default="bf16", choices=("none", "bf16", "fp16"), help="--amp of the main.py run")
    parser.add_argument("--e2e-compile", action="store_true", help="--compile in the main.py run")
    parser.add_argument("--report", default=None, help="also write the tables to this markdown file (CUDA only)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- building what main.py builds

def recipe_flags(args, amp: str = "none", channels_last: bool | None = None, compile_model: bool = False,
                 extra: list[str] | None = None) -> list[str]:
    """main.py's flags for the CREMA-D configuration (released recipe) with this run's switches."""
    flags = ["--dataset", "CREMAD", "--method", args.method, "--amp", amp, "--batch-size", str(args.batch_size),
             "--no-progress", "--device", str(args.device), *(extra or [])]
    if channels_last is not None:
        flags.append("--channels-last" if channels_last else "--no-channels-last")
    if compile_model:
        flags.append("--compile")
    return flags


def recipe(*args, **kwargs):
    """The Config those flags resolve to."""
    from config import build_parser, resolve_config

    return resolve_config(build_parser("bench").parse_args(recipe_flags(*args, **kwargs)))


def build(cfg, device, train_size: int, classes: int = CLASSES):
    """Model, method and step context, as main.py builds them."""
    import torch

    from engines.methods import model_and_method
    from engines.trainer import make_context

    torch.manual_seed(0)
    model, method = model_and_method(cfg, classes, ("audio", "visual"), train_size, device)
    return model, method, make_context(cfg, model, method, device)


class GeneratedBatches:
    """Endless batches of the given sizes; each class adds its own fixed pattern to the noise,
    so the task is learnable and a training run can show its loss falling."""

    def __init__(self, batch: int, device, seed: int, sizes: dict):
        import torch

        self.batch, self.device = batch, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        patterns = torch.Generator(device=device).manual_seed(1234)
        frame = sizes["frame"]
        self.audio = torch.randn(CLASSES, 1, *sizes["spectrogram"], generator=patterns, device=device)
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


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs_per_step(run_steps, device, steps: int = 3) -> float:
    """Synchronizations per training step: CUDA's own count (set_sync_debug_mode) on a GPU; on
    the CPU the repository's tensor-to-host reads (utils/host_reads.py)."""
    import torch

    if device.type != "cuda":
        from utils.host_reads import count_host_reads

        with count_host_reads() as counts:
            run_steps(steps)
        return sum(counts.values()) / steps
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_steps(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


# ---------------------------------------------------------------- 1. the step, per variant

def measure(args, variant: str, device, sizes: dict) -> dict:
    """Samples/s, peak memory and syncs per step of full OLM steps on one fixed batch."""
    import itertools

    import torch

    from engines.engines_logits_com import DiagnosticMeans, train_step
    from engines.metrics import HeadMetrics

    amp, channels_last, compiled = VARIANTS[variant]
    cfg = recipe(args, amp, channels_last, compiled, [*sizes["main_flags"], "--reference-steps", "2"])
    model, method, ctx = build(cfg, device, train_size=2 * args.batch_size)
    train = next(GeneratedBatches(args.batch_size, device, 0, sizes))
    heldout_iter = itertools.repeat(next(GeneratedBatches(cfg.heldout_batch_size, device, 1, sizes)))
    metrics = HeadMetrics(method.heads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def steps(count):
        for _ in range(count):
            train_step(model, method, train, heldout_iter, ctx, metrics, DiagnosticMeans())

    began = time.perf_counter()
    steps(args.warmup)
    synchronize(device)
    warmup_seconds = time.perf_counter() - began
    began = time.perf_counter()
    steps(args.steps)
    synchronize(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else math.nan
    return {"variant": variant, "samples_per_s": args.steps * args.batch_size / seconds,
            "ms_per_step": 1000 * seconds / args.steps, "peak_gib": peak, "warmup_s": warmup_seconds,
            "syncs": host_syncs_per_step(steps, device), "heldout": cfg.heldout_batch_size}


# ---------------------------------------------------------------- 2. OLM under --amp

def training_run(args, amp: str, device, sizes: dict) -> dict:
    """``args.train_steps`` OLM steps on fresh generated batches under ``--amp amp``."""
    import torch

    from engines.engines_logits_com import DiagnosticMeans, read_checks, train_step
    from engines.metrics import HeadMetrics
    from utils.errors import UserError

    cfg = recipe(args, amp, None, False, [*sizes["main_flags"], "--reference-steps", str(args.reference_steps)])
    model, method, ctx = build(cfg, device, train_size=args.reference_steps * args.batch_size)
    train = GeneratedBatches(args.batch_size, device, 2, sizes)
    heldout = GeneratedBatches(cfg.heldout_batch_size, device, 3, sizes)
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
    read_checks(ctx)
    synchronize(device)
    seconds = time.perf_counter() - began
    weights = list(model.parameters()) + list(method.coefficient_parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in weights)
    modulator = getattr(method, "modulator", None)  # OLM's; other methods have no rate target
    rate_active = modulator is None or not modulator.collecting_reference
    if not finite or skipped >= args.train_steps // 2 or not rate_active:
        raise UserError(f"the --amp {amp} OLM run did not train: finite weights {finite}, {skipped} of "
                        f"{args.train_steps} steps skipped by the scaler, rate target active {rate_active}")
    first, last = losses[:5], losses[-5:]
    return {"amp": amp, "steps": args.train_steps, "skipped": skipped, "seconds": seconds,
            "loss_first": sum(first) / len(first), "loss_last": sum(last) / len(last),
            "coefficients": method.coefficients(),
            "scale": ctx.scaler.get_scale() if ctx.scaler else None,
            "saturated": sum(s for s in saturated if s is not None) / max(1, sum(s is not None for s in saturated))}


# ---------------------------------------------------------------- 3. main.py against compute alone

class UtilizationSampler:
    """The GPU's utilization every ``period`` seconds while it runs (torch.cuda.utilization,
    which needs the nvidia-ml-py package); ``mean`` is None where it cannot be read."""

    def __init__(self, device, period: float = 0.25):
        self.device, self.period, self.samples = device, period, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        import torch

        while not self.stop.wait(self.period):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML: utilization is simply not reported
                return

    def __enter__(self):
        if self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def compute_only(cfg, device, sizes: dict, train_steps: int, eval_samples: int, classes: int) -> float:
    """Seconds of ``train_steps`` training steps and the evaluation of ``eval_samples`` samples,
    on batches already on the device: what an epoch costs with loading taken away."""
    import itertools

    from engines.engines_logits_com import evaluate, read_checks, train_one_epoch

    model, method, ctx = build(cfg, device, train_size=train_steps * cfg.batch_size, classes=classes)
    batches = GeneratedBatches(cfg.batch_size, device, 4, sizes)
    train = [next(batches) for _ in range(min(train_steps, 8))]
    heldout = itertools.repeat(next(GeneratedBatches(cfg.heldout_batch_size, device, 5, sizes)))
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    evaluation = [next(GeneratedBatches(eval_batch, device, 6, sizes)) for _ in range(2)]
    repeat = lambda items, count: [items[i % len(items)] for i in range(count)]  # noqa: E731

    def epoch():
        train_one_epoch(model, method, repeat(train, train_steps), heldout, ctx, 0)
        evaluate(model, repeat(evaluation, math.ceil(eval_samples / eval_batch)), method.heads, ctx, "", method)
        read_checks(ctx)

    epoch()  # warm-up: cuDNN, allocator, compilation
    synchronize(device)
    began = time.perf_counter()
    epoch()
    synchronize(device)
    return time.perf_counter() - began


def end_to_end(args, device, sizes: dict, scratch: Path) -> dict:
    """``--epochs`` epochs of main.py on a generated CREMA-D-sized fixture, beside compute alone."""
    import torch

    import main
    from benchmarks.bench_loader import write_fixture
    from config import build_parser, get_dataset_spec, resolve_config
    from datasets.builders import build_data

    root = scratch / "CREMAD"
    began = time.perf_counter()
    write_fixture(root, args.clips)
    fixture_seconds = time.perf_counter() - began
    out = scratch / "run"
    flags = ["--data-root", str(root), "--epochs", str(args.epochs), "--workers", str(args.workers),
             "--no-plots", "--keep-checkpoints", "none", "--out", str(out), *sizes["main_flags"]]
    argv = recipe_flags(args, args.e2e_amp, None, args.e2e_compile, flags)
    cfg = resolve_config(build_parser("bench").parse_args(argv))
    data = build_data(cfg, get_dataset_spec("CREMAD"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with UtilizationSampler(device) as utilization:
        began = time.perf_counter()
        main.main(argv)
        wall = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else math.nan
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = rows[0]["step"]
    compute = compute_only(cfg, device, sizes, steps, len(data.val) + len(data.test), len(data.class_names))
    return {"clips": args.clips, "train": len(data.train), "val": len(data.val), "test": len(data.test),
            "steps": steps, "epochs": [row["seconds"] for row in rows], "wall": wall, "compute": compute,
            "utilization": utilization.mean, "peak_gib": peak, "fixture_s": fixture_seconds,
            "workers": args.workers, "amp": args.e2e_amp, "compile": args.e2e_compile}


# ---------------------------------------------------------------- tables

def gib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f} GiB"


def throughput_table(rows: list[dict]) -> str:
    baseline = next((r["samples_per_s"] for r in rows if r["variant"] == "fp32"), rows[0]["samples_per_s"])
    lines = ["| variant | samples/s | ms/step | vs fp32 | peak memory | host syncs per step | warm-up s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['samples_per_s']:.1f} | {row['ms_per_step']:.1f} | "
                     f"{row['samples_per_s'] / baseline:.2f}x | {gib(row['peak_gib'])} | {row['syncs']:.1f} | "
                     f"{row['warmup_s']:.1f} |")
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


def end_to_end_text(e2e: dict) -> str:
    utilization = "not read (no NVML)" if e2e["utilization"] is None else f"{e2e['utilization']:.0f}%"
    lines = [f"`main.py` on a generated CREMA-D-like fixture ({e2e['clips']} clips: {e2e['train']} train, "
             f"{e2e['val']} val, {e2e['test']} test), `--amp {e2e['amp']}`{' --compile' if e2e['compile'] else ''}, "
             f"loader workers: {e2e['workers']}, the spectrogram cache cold in epoch 1; compute alone is the same "
             f"{e2e['steps']} training steps and {e2e['val'] + e2e['test']} evaluated samples on batches already "
             "on the device.", "",
             "| epoch | seconds | compute alone, s | epoch / compute |", "|---|---|---|---|"]
    lines += [f"| {n} | {seconds:.1f} | {e2e['compute']:.1f} | {seconds / e2e['compute']:.2f}x |"
              for n, seconds in enumerate(e2e["epochs"], start=1)]
    lines += ["", f"Mean GPU utilization over the run: {utilization}; peak memory {gib(e2e['peak_gib'])}; "
                  f"whole command {e2e['wall']:.0f} s (writing the fixture: {e2e['fixture_s']:.0f} s)."]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run

def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from utils.device import resolve_device
    from utils.errors import UserError

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sizes = RELEASED if cuda else SMALL
    if cuda:
        if any(VARIANTS[v][0] == "bf16" for v in args.variants) and not torch.cuda.is_bf16_supported():
            raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; leave out the "
                            "bf16 variants")
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        card = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        where = f"{card} ({memory:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        import utils.device

        utils.device.COMPILE_BACKEND = "aot_eager"  # the CPU part needs no C compiler
        torch.set_num_threads(1)  # one compute thread: steady on a shared CPU
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.batch_size, args.train_steps = min(args.batch_size, 8), min(args.train_steps, 6)
        args.reference_steps, args.clips = min(args.reference_steps, 2), min(args.clips, 60)
        args.epochs, args.workers = min(args.epochs, 1), min(args.workers, 1)
        where = f"no CUDA device: the CPU part (torch {torch.__version__}), small sizes, not a measurement"
    spec, frame = sizes["spectrogram"], sizes["frame"]
    heading = (f"{where}; batch {args.batch_size} at {spec[0]}x{spec[1]} spectrograms and {frame}x{frame} "
               f"frames, {args.method}/bilinear, 6 classes, CREMA-D recipe")
    print(heading, flush=True)
    rows = []
    for variant in args.variants:
        rows.append(measure(args, variant, device, sizes))
        print(f"  {variant}: {rows[-1]['samples_per_s']:.1f} samples/s, {rows[-1]['syncs']:.1f} host syncs "
              f"per step", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    runs = []
    for amp in ("bf16", "fp16") if args.train_steps > 0 else ():
        runs.append(training_run(args, amp, device, sizes))
        print(f"  OLM --amp {amp}: {runs[-1]['steps']} steps, {runs[-1]['skipped']} skipped, fusion loss "
              f"{runs[-1]['loss_first']:.3f} -> {runs[-1]['loss_last']:.3f}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    e2e = None
    if args.clips > 0 and args.epochs > 0:
        with tempfile.TemporaryDirectory(prefix="olm-bench-gpu-") as scratch:
            previous = os.environ.get("OLM_CACHE")
            os.environ["OLM_CACHE"] = str(Path(scratch) / "cache")  # cold: epoch 1 fills it
            try:
                e2e = end_to_end(args, device, sizes, Path(scratch))
            finally:
                if previous is None:
                    os.environ.pop("OLM_CACHE", None)
                else:
                    os.environ["OLM_CACHE"] = previous
    body = (f"{heading}.\n\nFull OLM training steps ({args.steps} timed after {args.warmup} warm-up steps, one "
            f"fixed batch, a held-out batch of {rows[0]['heldout'] if rows else '-'} every step; data loading "
            f"excluded; host syncs per step as {'CUDA' if cuda else 'utils/host_reads.py'} counts them):"
            f"\n\n{throughput_table(rows)}\n")
    if runs:
        body += (f"\nShort OLM training runs ({args.train_steps} steps, fresh generated batches with "
                 f"learnable classes, reference window {args.reference_steps} steps, then the rate target):"
                 f"\n\n{training_table(runs)}\n")
    if e2e:
        body += "\n" + end_to_end_text(e2e) + "\n"
    if not cuda:
        body += "\nNot measured (no CUDA device):\n" + "".join(f"\n- {item}" for item in NOT_MEASURED_ON_CPU) + "\n"
    print("\n" + body)
    if args.report:
        if not cuda:
            print(f"report: not written (no CUDA device); {args.report} keeps its last CUDA figures")
            return
        from utils.provenance import write_report

        print(f"report: {write_report(args.report, body)}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
