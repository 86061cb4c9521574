"""Peak memory and time of one training step of the mid-fusion transformers at MER-MULTI sizes.

Released sizes (1024-d features, d_model 768, 3 layers, 8 heads, 12 pivots, each model's
released feed-forward width), audio and visual sequences as long as MER-MULTI's longest
(about 2,300 and 1,100 steps), a small batch, random inputs, on the CPU. Each model runs in
a fresh process, so the peak resident memory (ru_maxrss) is that model's alone; the memory
before the step (model, inputs, optimizer) is given too. ``math`` (``--backends``, ``--math-models``) forces
PyTorch's reference attention, which materialises every (T x T) attention map, to show what
``scaled_dot_product_attention``'s fused kernels save. Examples:

    OMP_NUM_THREADS=1 python -m benchmarks.bench_trans_memory --models mbt --backends auto math --math-models
    OMP_NUM_THREADS=1 python -m benchmarks.bench_trans_memory --report docs/results/bench-trans-memory.md
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL_TYPES = ("emt", "mbt", "umt", "ca")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_TYPES), choices=MODEL_TYPES,
                        help="model types to measure")
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=("auto", "math"),
                        help="attention backends: auto (PyTorch picks a fused kernel) and/or math")
    parser.add_argument("--math-models", nargs="*", default=["mbt"], choices=MODEL_TYPES,
                        help="models measured once more with --backends math's reference attention")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout, attention dropout included (released: 0.1); PyTorch's fused CPU "
                             "kernels take no attention dropout, so 0 shows what they save")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step (released: 2)")
    parser.add_argument("--audio-steps", type=int, default=2300, help="audio sequence length in steps")
    parser.add_argument("--visual-steps", type=int, default=1100, help="visual sequence length in steps")
    parser.add_argument("--report", help="also write the table to this markdown file "
                                         "(e.g. docs/results/bench-trans-memory.md)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "audio_steps", "visual_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_one(model_type: str, backend: str, args) -> dict:
    """One training step in this process; returns its figures."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.transformers.build import build_transformer
    from models.transformers.released import RELEASED_SETUP

    torch.manual_seed(0)
    setup = RELEASED_SETUP
    model = build_transformer(model_type, setup["modalities"], setup["input_dim"], setup["num_classes"],
                              d_model=setup["d_model"], num_layers=setup["num_layers"],
                              num_heads=setup["num_heads"], num_bottleneck=setup["num_bottleneck"],
                              dropout=args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = {"audio": args.audio_steps, "visual": args.visual_steps}
    inputs = {m: torch.randn(args.batch_size, steps[m], setup["input_dim"]) for m in setup["modalities"]}
    # Ragged batch: the last sample is a third shorter, as padded MER batches are.
    inputs["masks"] = {m: torch.arange(steps[m])[None, :] < torch.tensor(
        [steps[m]] * (args.batch_size - 1) + [max(1, 2 * steps[m] // 3)])[:, None] for m in steps}
    labels = torch.randint(0, setup["num_classes"], (args.batch_size,))
    before = peak_mib()
    context = sdpa_kernel([SDPBackend.MATH]) if backend == "math" else contextlib.nullcontext()
    began = time.perf_counter()
    with context:
        logits = model(inputs)
        loss = sum(F.cross_entropy(logits[h], labels) for h in model.heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - began
    return {"model": model_type, "backend": backend, "parameters": sum(p.numel() for p in model.parameters()),
            "peak_mib": peak_mib(), "before_step_mib": before, "step_s": seconds,
            "threads": torch.get_num_threads()}


def run_child(model_type: str, backend: str, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_trans_memory", "--child", model_type, backend,
               "--batch-size", str(args.batch_size), "--audio-steps", str(args.audio_steps),
               "--visual-steps", str(args.visual_steps), "--dropout", str(args.dropout)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"model": model_type, "backend": backend, "error": tail[0][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_map_mib(batch: int, heads: int, steps: int) -> float:
    return batch * heads * steps * steps * 4 / 2**20  # one float32 (T x T) map per head


def table(rows: list[dict], args) -> str:
    from models.transformers.released import RELEASED_SETUP

    lines = [f"One training step (forward, CE on every head, backward, Adam) at batch {args.batch_size}, "
             f"audio {args.audio_steps} and visual {args.visual_steps} steps of 1024-d features, released "
             f"widths (d_model {RELEASED_SETUP['d_model']}), dropout {args.dropout}, random inputs, CPU. Peak = the process's peak "
             "resident memory; before = after building the model, optimizer and inputs.",
             "",
             "| model | attention | parameters | before step MiB | peak MiB | step s | threads |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['backend']} | failed: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['backend']} | {row['parameters'] / 1e6:.1f}M | "
                     f"{row['before_step_mib']:.0f} | {row['peak_mib']:.0f} | {row['step_s']:.1f} | {row['threads']} |")
    heads = RELEASED_SETUP["num_heads"]
    lines += ["", f"For scale: one float32 attention map over all {heads} heads of the audio self-attention is "
              f"{attention_map_mib(args.batch_size, heads, args.audio_steps + 1):.0f} MiB at batch {args.batch_size} "
              f"and {attention_map_mib(64, heads, args.audio_steps + 1) / 1024:.1f} GiB at batch 64; the math "
              "backend keeps one per layer and stream for the backward pass."]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(args.child[0], args.child[1], args)))
        return
    from tqdm import tqdm

    jobs = [(m, b) for m in args.models for b in args.backends]
    jobs += [(m, "math") for m in args.math_models if (m, "math") not in jobs]
    rows = [run_child(m, b, args) for m, b in tqdm(jobs, desc="transformer steps", unit="run")]
    body = table(rows, args)
    print(body)
    if args.report:
        from utils.provenance import write_report

        import shlex

        command = "python -m benchmarks.bench_trans_memory " + shlex.join(sys.argv[1:])
        print(f"report: {write_report(args.report, body, command=command)}")


if __name__ == "__main__":
    main()
