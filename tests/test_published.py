"""utils/published.py: BalanceBenchmark's numbers as the docs print them, and our gains over
joint training paired by seed, beside their gains over their Baseline."""
import re
from pathlib import Path

import pytest

from tests.test_plot import write_run
from utils import published

REPO = Path(__file__).resolve().parents[1]
NORMS = [{"audio": 1.0, "visual": 1.0, "fusion": 1.0}]


def test_the_published_numbers_are_the_table_the_docs_print():
    text = (REPO / "docs" / "comparison.md").read_text()
    section = text[text.index("## Published numbers on the real datasets"):]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| .*?\(`(\w+)`\) \| (.+) \|$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.group(2).split(" | ")]
    assert len(rows) == len(published.PUBLISHED) - 3  # the unimodal and baseline rows carry no name
    for method, values in rows.items():
        expected = [v for d in published.DATASETS for v in published.PUBLISHED[method][d]]
        assert values == expected, method


def test_gains_are_paired_by_seed_and_theirs_are_over_their_baseline(tmp_path):
    folder = tmp_path / "compare-AVDigits"
    for seed, (joint, mla) in enumerate([(0.80, 0.85), (0.90, 0.88)]):
        write_run(folder / f"joint-s{seed}", "joint", seed, {"fusion": joint, "audio": 0.5, "visual": 0.5},
                  NORMS, 1)
        write_run(folder / f"mla-s{seed}", "mla", seed, {"fusion": mla, "audio": 0.5, "visual": 0.5},
                  NORMS, 1)
    write_run(folder / "mla-s7", "mla", 7, {"fusion": 0.99, "audio": 0.5, "visual": 0.5}, NORMS, 1)
    table = published.render([folder])
    row = next(line for line in table.splitlines() if line.startswith("| `mla` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # seed 0: +5, seed 1: -2 (seed 7 has no joint run to pair with): mean 1.5, sample std 4.95
    assert cells[2] == "+1.5 ± 4.9 (2)"
    assert cells[1] == "90.7 ± 7.4"  # all three seeds' fusion accuracy: 85, 88, 99
    assert cells[3:] == ["+3.42", "+6.80", "+1.91"]  # 69.05-65.63, 72.30-65.50, 49.99-48.08
    assert published.their_gain("joint", "CREMAD") is None
    assert published.their_gain("mmpareto", "CREMAD") == pytest.approx(79.97 - 65.50)
