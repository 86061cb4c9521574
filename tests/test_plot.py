"""Diagnostic plots (utils/plot.py), the comparison aggregation (utils/compare.py) and the
driver script (scripts/compare.sh), on synthetic run folders written here."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utils import compare, plot
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HEADS = ("audio", "visual", "fusion")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def head_metrics(acc, norm):
    return {"loss": 1.0 - acc, "acc": acc, "f1": acc - 0.05, "norm": norm}


def write_run(folder, method, seed, test_acc, norms_by_epoch, best_epoch, selection="fusion", olm=None,
              config_extra=None):
    """A run folder as main.py leaves it: config.yaml, metrics.jsonl, results.json.

    test_acc: head -> test accuracy at the best epoch; norms_by_epoch: list (one per epoch) of
    head -> val norm; olm: list (one per epoch) of OLM diagnostics or None.
    """
    folder = Path(folder)
    folder.mkdir(parents=True)
    config = {"dataset": "AVDigits", "method": method, "seed": seed, "epochs": len(norms_by_epoch),
              "lr": 1e-3, "fusion": "bilinear", "device": "cpu", "out": str(folder)}
    config.update(config_extra or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for epoch, norms in enumerate(norms_by_epoch, start=1):
        split = {h: head_metrics(0.1 * epoch, norms[h]) for h in HEADS}
        rows.append({"epoch": epoch, "train": split, "val": split, "test": split,
                     "coefficients": {h: 1.0 + 0.1 * epoch for h in HEADS},
                     "olm": (olm[epoch - 1] if olm else {})})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = {h: head_metrics(test_acc[h], 1.0) for h in HEADS}
    results = {"dataset": "AVDigits", "method": method, "seed": seed, "fusion": "bilinear",
               "epochs": len(norms_by_epoch), "best_epoch": best_epoch, "selection_head": selection,
               "val": test, "test": test}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def olm_diagnostics(saturated, ratios=(0.2, 0.5, 0.3)):
    """One epoch's OLM diagnostics; a saturated share goes to the visual head."""
    return {"ratios": dict(zip(HEADS, ratios)), "G": {"audio": 0.1, "visual": 0.3, "fusion": 0.2},
            "C": {"audio": 0.4, "visual": 0.1, "fusion": 0.2}, "saturated": saturated,
            "saturated_head": {"audio": 0.0, "visual": saturated, "fusion": 0.0},
            "targets_mean": {h: 1.0 for h in HEADS}, "norms_mean": {h: 2.0 for h in HEADS}}


NORMS = [{"audio": 4.0, "visual": 2.0, "fusion": 8.0}, {"audio": 6.0, "visual": 1.5, "fusion": 9.0}]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


# -- utils/plot.py -----------------------------------------------------------------------
def test_plot_run_writes_the_diagnostics_png(tmp_path):
    run = write_run(tmp_path / "olm-s0", "olm", 0, {h: 0.5 for h in HEADS}, NORMS, 2,
                    olm=[olm_diagnostics(0.0), olm_diagnostics(1.0)])
    out = plot.plot_run(run)
    assert out == run / "diagnostics.png"
    assert_png(out)


def test_plot_side_by_side_with_a_run_without_olm_diagnostics(tmp_path):
    olm = write_run(tmp_path / "olm-s0", "olm", 0, {h: 0.5 for h in HEADS}, NORMS, 2,
                    olm=[olm_diagnostics(0.0), olm_diagnostics(1.0)])
    joint = write_run(tmp_path / "joint-s0", "joint", 0, {h: 0.4 for h in HEADS}, NORMS, 1)
    plot.main([str(joint), str(olm), "--out", str(tmp_path / "figs" / "both.png")])
    assert_png(tmp_path / "figs" / "both.png")
    assert plot.run_label(olm).startswith("olm s0")


def test_plot_errors_clearly_without_metrics(tmp_path):
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl in .*empty-run"):
        plot.plot_run(tmp_path / "empty-run")
    result = subprocess.run([sys.executable, "-m", "utils.plot", str(tmp_path / "empty-run")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_plot_errors_clearly_on_a_corrupt_metrics_file(tmp_path):
    run = write_run(tmp_path / "joint-s0", "joint", 0, {h: 0.4 for h in HEADS}, NORMS, 1)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 3, "train"\n')
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        plot.plot_run(run)


# -- utils/compare.py --------------------------------------------------------------------
@pytest.fixture
def comparison(tmp_path):
    root = tmp_path / "compare-AVDigits"
    write_run(root / "audio_only-s0", "audio_only", 0, {"audio": 0.60, "visual": 0.1, "fusion": 0.1}, NORMS, 2, "audio")
    write_run(root / "audio_only-s1", "audio_only", 1, {"audio": 0.70, "visual": 0.1, "fusion": 0.1}, NORMS, 2, "audio")
    write_run(root / "visual_only-s0", "visual_only", 0, {"audio": 0.1, "visual": 0.40, "fusion": 0.1}, NORMS, 2, "visual")
    write_run(root / "joint-s0", "joint", 0, {"audio": 0.50, "visual": 0.20, "fusion": 0.70}, NORMS, 2)
    write_run(root / "joint-s1", "joint", 1, {"audio": 0.54, "visual": 0.30, "fusion": 0.80}, NORMS, 1)
    write_run(root / "olm-s0", "olm", 0, {"audio": 0.55, "visual": 0.45, "fusion": 0.85}, NORMS, 2,
              olm=[olm_diagnostics(0.0, (1 / 3, 1 / 3, 1 / 3)), olm_diagnostics(0.5)])
    (root / "olm-s1").mkdir()  # started, never finished
    (root / "olm-s1" / "config.yaml").write_text("method: olm\n")
    return root


def test_compare_means_stds_and_gaps(comparison):
    summary = compare.summarize(comparison)
    methods = summary["methods"]
    assert list(methods) == ["audio_only", "visual_only", "joint", "olm"]
    assert summary["reference"] == ("audio_only", pytest.approx(0.65))
    # A unimodal baseline reports only its own head.
    assert set(methods["audio_only"]["heads"]) == {"audio"} and set(methods["visual_only"]["heads"]) == {"visual"}

    fusion = methods["joint"]["heads"]["fusion"]
    assert fusion["acc"][0] == pytest.approx(0.75)
    assert fusion["acc"][1] == pytest.approx(statistics.stdev([0.70, 0.80]))
    assert fusion["f1"][0] == pytest.approx(0.70)
    assert methods["joint"]["gap"] == pytest.approx(0.75 - 0.65)
    assert methods["olm"]["gap"] == pytest.approx(0.85 - 0.65)
    assert methods["olm"]["heads"]["fusion"]["acc"][1] == 0.0  # one seed
    assert methods["audio_only"]["gap"] is None


def test_compare_norm_ratio_comes_from_the_best_epoch(comparison):
    summary = compare.summarize(comparison)
    joint = summary["methods"]["joint"]
    # seed 0 is best at epoch 2 (6 / 1.5 = 4), seed 1 at epoch 1 (4 / 2 = 2)
    assert sorted(joint["norm_ratio_values"]) == pytest.approx([2.0, 4.0])
    assert joint["norm_ratio"][0] == pytest.approx(3.0)
    assert summary["methods"]["audio_only"]["norm_ratio"] is None


def test_compare_reports_the_olm_regime_and_unfinished_runs(comparison):
    summary = compare.summarize(comparison)
    regime = summary["methods"]["olm"]["regime"]
    # Epoch 1 is the reference epoch (uniform ratios by construction): the regime is epoch 2's.
    assert regime["saturated"] == pytest.approx(0.5)
    assert regime["mass"] == pytest.approx({"audio": 0.2, "visual": 0.5, "fusion": 0.3})
    assert regime["saturated_head"] == pytest.approx({"audio": 0.0, "visual": 0.5, "fusion": 0.0})
    assert regime["G"]["visual"] == pytest.approx(0.3) and regime["C"]["audio"] == pytest.approx(0.4)
    assert regime["coefficients"]["fusion"] == pytest.approx(1.2)  # results.json's final w
    assert summary["methods"]["joint"]["regime"] is None
    assert [Path(p).name for p in summary["unfinished"]] == ["olm-s1"]
    assert summary["protocol_differences"] == {}


def test_compare_cli_writes_markdown_and_figure(comparison):
    compare.main([str(comparison)])
    text = (comparison / "compare.md").read_text()
    assert "| joint | 2 |" in text and "75.0 ± 7.1" in text and "+10.0" in text
    assert text.startswith("_Written by")  # provenance header, for the README's generated blocks
    assert "saturated steps" in text and "| olm | 1 | 50% ± 0 | audio 0.20 ± 0.00, visual 0.50" in text
    assert "Skipped 1 unfinished" in text
    assert_png(comparison / "compare.png")


def test_compare_groups_a_variant_under_its_own_label_and_gaps_against_own_heads(tmp_path):
    root = tmp_path / "compare-AVDigits"
    for seed, fusion in ((0, 0.80), (1, 0.90)):
        write_run(root / f"olm-s{seed}", "olm", seed, {"audio": 0.70, "visual": 0.40, "fusion": fusion}, NORMS, 2,
                  config_extra={"heldout_norm": "batch"})
        write_run(root / f"olm-running-s{seed}", "olm", seed, {"audio": 0.75, "visual": 0.30, "fusion": 0.85},
                  NORMS, 2, config_extra={"heldout_norm": "running"})
    write_run(root / "my-joint-run", "joint", 0, {"audio": 0.7, "visual": 0.3, "fusion": 0.8}, NORMS, 2)
    summary = compare.summarize(root)
    assert list(summary["methods"]) == ["joint", "olm", "olm-running"]
    assert summary["protocol_differences"] == {}  # heldout_norm may differ between the two labels
    # No audio_only/visual_only: each run's fusion minus its best unimodal head.
    assert summary["methods"]["olm"]["gap_values"] == pytest.approx([0.10, 0.20])
    assert summary["methods"]["olm-running"]["gap_values"] == pytest.approx([0.10, 0.10])
    text = compare.render_markdown(summary)
    assert "| olm-running | 2 |" in text and "+15.0 ± 7.1" in text and "same model" in text


def test_compare_cli_also_writes_a_report_copy(comparison, tmp_path):
    compare.main([str(comparison), "--no-figure", "--report", str(tmp_path / "docs" / "compare.md")])
    copy = (tmp_path / "docs" / "compare.md").read_text()
    assert copy.startswith("_Written by") and "| joint | 2 |" in copy


def test_compare_warns_when_the_protocol_differs(comparison):
    write_run(comparison / "olm_mean-s0", "olm_mean", 0, {h: 0.5 for h in HEADS}, NORMS, 2,
              config_extra={"lr": 1e-4})
    summary = compare.summarize(comparison)
    assert set(summary["protocol_differences"]) == {"lr"}
    assert "do not share one protocol" in compare.render_markdown(summary)


def test_compare_errors_clearly(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare.summarize(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no finished run"):
        compare.summarize(tmp_path / "empty")


# -- scripts/compare.sh ------------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: logs its arguments; "main.py ... --out DIR" writes DIR/results.json.
echo "$@" >> "$CALL_LOG"
if [[ "$1" == "main.py" ]]; then
  while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--out" ]]; then mkdir -p "$2"; echo '{}' > "$2/results.json"; fi
    shift
  done
fi
"""


def run_script(tmp_path, *args, methods="joint olm"):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "CALL_LOG": str(log), "COMPARE_ROOT": str(tmp_path / "runs")}
    env.pop("METHODS", None)
    if methods is not None:  # None: the script's own default list
        env["METHODS"] = methods
    result = subprocess.run(["bash", str(REPO / "scripts" / "compare.sh"), *args], env=env,
                            capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_compare_script_runs_every_registered_method_by_default(tmp_path):
    from olmbalance import METHODS, method_entry

    method_entry("olm")  # the registry filled
    result, calls = run_script(tmp_path, "cpu", "AVDigits", "1", methods=None)
    assert result.returncode == 0, result.stderr
    ran = {c.split("--method ")[1].split()[0] for c in calls if c.startswith("main.py")}
    assert ran == set(METHODS)


def test_compare_script_runs_each_method_and_seed_then_resumes(tmp_path):
    result, calls = run_script(tmp_path, "cpu", "AVDigits", "2", "--epochs", "1", "--image-size", "8")
    assert result.returncode == 0, result.stderr
    trainings = [c for c in calls if c.startswith("main.py")]
    assert len(trainings) == 4
    root = tmp_path / "runs" / "compare-AVDigits"
    assert f"--method olm --seed 1 --out {root}/olm-s1 --device cpu --epochs 1 --image-size 8" in trainings[3]
    assert calls[-1] == f"-m utils.compare {root}"

    # A second call skips finished runs and resumes an interrupted one.
    (root / "joint-s1" / "results.json").unlink()
    (root / "joint-s1" / "last.pt").write_text("")
    _, calls = run_script(tmp_path, "cpu", "AVDigits", "2")
    trainings = [c for c in calls[len(calls) - 2:] if c.startswith("main.py")]
    assert len(trainings) == 1 and f"--resume {root}/joint-s1" in trainings[0]


def test_compare_script_runs_a_variant_under_its_label(tmp_path):
    result, calls = run_script(tmp_path, "cpu", "AVDigits", "1", "--epochs", "1",
                               methods="olm olm:--heldout-norm=running whole=olm:--reference-tail=1")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "runs" / "compare-AVDigits"
    trainings = [c for c in calls if c.startswith("main.py")]
    assert len(trainings) == 3
    assert trainings[0].endswith(f"--out {root}/olm-s0 --device cpu --epochs 1")
    assert "--method olm " in trainings[1] and trainings[1].endswith(
        f"--out {root}/olm-running-s0 --device cpu --epochs 1 --heldout-norm=running")
    assert trainings[2].endswith(f"--out {root}/whole-s0 --device cpu --epochs 1 --reference-tail=1")


def test_compare_script_rejects_bad_arguments(tmp_path):
    result, calls = run_script(tmp_path, "gpu0")
    assert result.returncode == 2 and "GPU must be" in result.stderr and not calls
    result, _ = run_script(tmp_path, "cpu", "AVDigits", "zero")
    assert result.returncode == 2 and "SEEDS must be" in result.stderr


# -- utils/report.py ---------------------------------------------------------------------
def test_summary_table_shows_each_heads_target_ratio_and_saturated_share(tmp_path):
    from utils.report import summary_table

    olm = [olm_diagnostics(0.0, (1 / 3, 1 / 3, 1 / 3)), olm_diagnostics(0.5), olm_diagnostics(0.0, (0.4, 0.4, 0.2))]
    run = write_run(tmp_path / "olm-s0", "olm", 0, {"audio": 0.8, "visual": 0.4, "fusion": 0.9}, NORMS + NORMS[:1], 2,
                    olm=olm)
    results = json.loads((run / "results.json").read_text())
    results.update(seconds=12.0, coefficients={"audio": 0.9, "visual": 1.1, "fusion": 1.0}, run_dir=str(run))
    lines = summary_table(results).splitlines()
    assert lines[1].split() == ["head", "val", "acc", "test", "acc", "test", "F1", "coef", "ratio", "saturated"]
    # Epochs 2-3 (epoch 1 is the reference window): visual ratio (0.5 + 0.4) / 2, saturated 0.5 / 2.
    visual = next(line for line in lines if line.startswith("visual")).split()
    assert visual[4:] == ["1.100", "0.450", "25%"]
    assert next(line for line in lines if line.startswith("audio")).split()[-1] == "0%"
    assert "25% of steps in all, epochs 2-3" in lines[-1]
    # Without OLM diagnostics (joint) the table keeps its short form.
    joint = write_run(tmp_path / "joint-s0", "joint", 0, {h: 0.5 for h in HEADS}, NORMS, 2)
    results = {**json.loads((joint / "results.json").read_text()), "seconds": 3.0, "run_dir": str(joint)}
    assert summary_table(results).splitlines()[1].split()[-1] == "coef"


def test_diagnostics_figure_has_a_target_mass_panel(tmp_path):
    run = write_run(tmp_path / "olm-s0", "olm", 0, {h: 0.5 for h in HEADS}, NORMS, 2,
                    olm=[olm_diagnostics(0.0, (1 / 3, 1 / 3, 1 / 3)), olm_diagnostics(0.5)])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(plot.PANEL_TITLES), 1)
    plot.draw_run(axes, plot.read_rows(run), "olm")
    mass = axes[-1]
    assert "target mass" in mass.get_title()
    assert [c.get_label() for c in mass.collections] == ["audio mass", "visual mass", "fusion mass"]
    saturated = {line.get_label(): list(line.get_ydata()) for line in mass.get_lines()}
    assert saturated["saturated on visual"] == [0.0, 0.5]
    plt.close(figure)
