"""Time the test suite (or some test files) the way a user runs it (the environment as given),
and report the wall time, the slowest tests and the machine. Examples:

    python benchmarks/suite_time.py                                   # the whole suite
    python benchmarks/suite_time.py tests/test_main.py --report docs/results/suite-time.md
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders [tests]")
    parser.add_argument("--slowest", type=int, default=10, help="how many slowest tests to list [10]")
    parser.add_argument("--report", help="also write the figures to this markdown file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--durations={args.slowest}",
               *args.paths]
    began = time.time()
    # The environment as given: the README's test command sets no thread count either.
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.time() - began
    lines = done.stdout.splitlines()
    slowest = [line for line in lines if re.match(r"^\d+\.\d+s (call|setup|teardown) ", line)]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
                   "no summary")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    body = (f"`python -m pytest {' '.join(args.paths)}` (OMP_NUM_THREADS {threads}): **{seconds:.0f} s** wall "
            f"({summary}).\n\nSlowest:\n\n```\n" + "\n".join(slowest) + "\n```\n")
    print(body)
    if args.report:
        sys.path.insert(0, str(REPO))
        from utils.provenance import write_report

        print(f"wrote {write_report(args.report, body)}")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
