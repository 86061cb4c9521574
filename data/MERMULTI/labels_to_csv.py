"""MER-MULTI: write <root>/labels.csv (`name,emo,val,split`) from MER2023's released
label-6way.npz, once, so later runs read the plain CSV and never unpickle.

The npz holds pickled dicts, and unpickling can run code hidden in the file: run this only on
a file you trust (the challenge's own download). `--label-file` on main_trans.py reads the npz
directly instead, with the same caution.

Usage:
    python data/MERMULTI/labels_to_csv.py --label-file MER2023/label-6way.npz --out MER2023/labels.csv
"""
import argparse
import csv
from collections import Counter
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.mer_labels import CSV_COLUMNS, read_label_npz
    from utils.cli import run_cli

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label-file", type=Path, required=True, help="the released label-6way.npz (read with pickle)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write, e.g. <root>/labels.csv")
    args = parser.parse_args(argv)

    def convert():
        from utils.errors import UserError

        if not args.label_file.is_file():
            raise UserError(f"--label-file {args.label_file} does not exist")
        samples, unlabelled = read_label_npz(args.label_file)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for sample in samples:
                writer.writerow([sample.name, sample.emotion, "" if sample.valence is None else sample.valence,
                                 sample.split])
        splits = Counter(sample.split for sample in samples)
        print(f"wrote {args.out}: {len(samples)} labelled samples ("
              + ", ".join(f"{n} {split}" for split, n in sorted(splits.items()))
              + f"); {unlabelled} without an emotion left out")

    run_cli(convert)


if __name__ == "__main__":
    main()
