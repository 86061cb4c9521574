"""One table from several main_trans.py cross-validation folders: per head, test accuracy
(mean +- std over the folds that ran), with each run's wall time.

    python -m benchmarks.trans_cv_table "ca olm, before=runs/ca-olm-old" "ca olm=runs/ca-olm" \\
        --split test1 --report docs/results/ca-fix-embedded.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a row label and a cross-validation folder")
    parser.add_argument("--split", default="test1", help="test set to tabulate")
    parser.add_argument("--report", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    for run in args.runs:
        if "=" not in run:
            parser.error(f"{run!r}: give LABEL=DIR")
    return args


def load(run: str) -> tuple[str, dict]:
    label, folder = run.rsplit("=", 1)
    path = Path(folder) / "cv_results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: not a finished cross-validation folder")
    return label, json.loads(path.read_text())


def table(runs: list[tuple[str, dict]], split: str) -> str:
    heads = []
    for _, results in runs:
        heads += [h for h in results["heads"] if h not in heads]
    lines = [f"Accuracy on {split}, mean ± std over the folds that ran; wall time of the cross-validation.",
             "",
             "| run | folds | s | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    for label, results in runs:
        summary = results["summary"].get(split, {})
        cells = [f"{summary[h]['acc']['mean']:.3f} ± {summary[h]['acc']['std']:.3f}" if h in summary else ""
                 for h in heads]
        lines.append(f"| {label} | {results['folds_run']} of {results['folds']} | {results['seconds']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    body = table([load(run) for run in args.runs], args.split)
    print(body)
    if args.report:
        from utils.provenance import write_report

        import shlex

        command = "python -m benchmarks.trans_cv_table " + shlex.join(sys.argv[1:])
        print(f"report: {write_report(args.report, body, command=command)}")


if __name__ == "__main__":
    main()
