"""End to end through main.py on a trimmed copy of the embedded AV-Digits set: every
registered method (so methods added later are covered) writes a run folder whose
results.json agrees with its metrics rows, with lean best.pt and --keep-checkpoints."""
import json

import pytest
import torch

import main
from config import KEEP_CHECKPOINTS, get_dataset_spec, resolve_config
from config import build_parser
from datasets.builders import build_data
from olmbalance import METHODS, method_entry
from tests.scaling_fixtures import TINY_FLAGS

method_entry("olm")  # registers the baselines, so the parametrization sees every method
ALL_METHODS = sorted(METHODS)


def test_avdigits_splits_are_disjoint_and_cover_every_class():
    cfg = resolve_config(build_parser("test").parse_args(
        ["--image-size", "16", "--n-fft", "62", "--hop-length", "250", "--spec-frames", "16", "--device", "cpu"]))
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    names = {split: {c.name for c in getattr(data, split).clips} for split in ("train", "val", "test")}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    for split in ("train", "val", "test"):
        assert set(getattr(data, split).labels) == set(range(10))
    inputs, label = data.train[0]
    assert inputs["audio"].shape == (1, 32, 16) and inputs["visual"].shape == (1, 3, 16, 16)


def expected_files(keep):
    return {"all": {"best.pt", "last.pt"}, "last": {"last.pt"}, "best": {"best.pt"}, "none": set()}[keep]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_through_main(tiny_avdigits, tmp_path, method):
    out = tmp_path / method
    keep = KEEP_CHECKPOINTS[ALL_METHODS.index(method) % len(KEEP_CHECKPOINTS)]  # every option, no extra run
    main.main([*TINY_FLAGS, "--data-root", tiny_avdigits, "--method", method, "--epochs", "2",
               "--keep-checkpoints", keep, "--out", out])
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert results["method"] == method and [row["epoch"] for row in rows] == [1, 2]
    head = results["selection_head"]
    best = max(rows, key=lambda row: (row["val"][head]["acc"], -row["epoch"]))
    assert results["best_epoch"] == best["epoch"]
    for split in ("val", "test"):
        assert set(results[split]) == set(best[split])
        for name, values in results[split].items():
            assert values["acc"] == best[split][name]["acc"] and values["f1"] == best[split][name]["f1"]
    assert results["coefficients"] == rows[-1]["coefficients"]
    if method == "joint":
        assert results["coefficients"] == {"audio": 1.0, "visual": 1.0, "fusion": 1.0}
    if method.startswith("olm"):
        assert results["coefficients"] != {"audio": 1.0, "visual": 1.0, "fusion": 1.0}
    assert {p.name for p in out.glob("*.pt")} == expected_files(keep)
    assert (out / "config.yaml").is_file() and any((out / "tensorboard").iterdir())
    # Imbalance diagnostics (on by default) read the run's own evaluated heads, whatever is kept.
    diagnostics = results["imbalance"]
    assert diagnostics["intact"]["test"]["acc"] == pytest.approx(results["test"][head]["acc"])
    assert (diagnostics["reliance"] is None) == (head != "fusion") and (out / "predictions.npz").is_file()
    if (out / "best.pt").is_file():
        lean = torch.load(out / "best.pt", weights_only=True)
        assert lean["epoch"] == results["best_epoch"] and lean["classes"] == results["classes"]
        assert lean["metrics"]["test"][head]["acc"] == results["test"][head]["acc"]
        assert "optimizers" not in lean and "rng" not in lean
    if keep == "all":
        assert (out / "best.pt").stat().st_size < 0.6 * (out / "last.pt").stat().st_size
        with pytest.raises(Exception, match="holds weights only"):
            main.main([*TINY_FLAGS, "--resume", out / "best.pt", "--epochs", "3", "--out", tmp_path / "again"])
    with pytest.raises(Exception, match="already holds a run"):
        main.main([*TINY_FLAGS, "--data-root", tiny_avdigits, "--method", method, "--epochs", "1", "--out", out])
