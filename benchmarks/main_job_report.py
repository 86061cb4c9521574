"""Run the main job (``scripts/run_logits_com.sh cpu``: OLM on the embedded AVDigitsImbalanced
set, its defaults) and write what it printed, its wall time (AV-Digits materialization included when the
cache is cold) and its checkpoint sizes to a report headed by the command and the CPU model.

    OMP_NUM_THREADS=1 python benchmarks/main_job_report.py --report docs/results/main-job.md
    python benchmarks/main_job_report.py --report /tmp/x.md -- --epochs 2   # flags after -- go to main.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="markdown file to write (e.g. docs/results/main-job.md)")
    parser.add_argument("--keep-run", help="leave the run folder here (default: a temporary folder)")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="main.py flags after '--' (the main job uses none)")
    return parser.parse_args(argv)


def run_main_job(run_dir: Path, flags: list[str]) -> tuple[str, float]:
    command = ["bash", str(REPO / "scripts" / "run_logits_com.sh"), "cpu", "--no-progress", "--out", str(run_dir),
               *flags]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    began = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - began
    if done.returncode != 0:
        sys.exit(f"error: the main job failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout, seconds


def body(printed: str, seconds: float, run_dir: Path, flags: list[str]) -> str:
    # Paths of the temporary run folder say nothing to a reader; keep the table.
    table = "\n".join(line for line in printed.splitlines() if not line.startswith(("run folder:", "figure:")))
    sizes = ", ".join(f"`{p.name}` {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(run_dir.glob("*.pt")))
    extra = f" {' '.join(flags)}" if flags else ""
    return (f"`bash scripts/run_logits_com.sh cpu{extra}` printed:\n\n```\n{table.strip()}\n```\n\n"
            f"Wall time {seconds:.0f} s ({seconds / 60:.1f} min), from the shell command to its exit. "
            f"Checkpoints in the run folder: {sizes}.\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    flags = [f for f in args.flags if f != "--"]
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(args.keep_run) if args.keep_run else Path(folder) / "main-job"
        printed, seconds = run_main_job(run_dir, flags)
        text = body(printed, seconds, run_dir, flags)
    print(text)
    from utils.provenance import write_report

    extra = f" -- {' '.join(flags)}" if flags else ""
    print(f"wrote {write_report(args.report, text, command=f'python benchmarks/main_job_report.py --report {args.report}{extra}')}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
