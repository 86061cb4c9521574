"""End to end on the embedded AV-Digits set: one epoch writes a valid run folder."""
import json

import pytest

import main
from config import build_parser, get_dataset_spec, resolve_config
from datasets.builders import build_data

TINY = ["--image-size", "16", "--n-fft", "62", "--hop-length", "250", "--spec-frames", "16",
        "--batch-size", "64", "--device", "cpu", "--no-progress", "--no-plots", "--workers", "0"]


def config(*flags):
    return resolve_config(build_parser("test").parse_args([*TINY, *flags]))


def test_avdigits_splits_are_disjoint_and_cover_every_class():
    cfg = config()
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    names = {split: {c.name for c in getattr(data, split).clips} for split in ("train", "val", "test")}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    for split in ("train", "val", "test"):
        assert set(getattr(data, split).labels) == set(range(10))
    inputs, label = data.train[0]
    assert inputs["audio"].shape == (1, 32, 16) and inputs["visual"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("method", ["olm", "olm_loss_ratio", "joint"])
def test_one_epoch_writes_results(tmp_path, method):
    out = tmp_path / method
    main.main([*TINY, "--method", method, "--epochs", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "AVDigits" and results["method"] == method and results["best_epoch"] == 1
    for split in ("val", "test"):
        for head in ("audio", "visual", "fusion"):
            assert 0.0 <= results[split][head]["acc"] <= 1.0 and 0.0 <= results[split][head]["f1"] <= 1.0
    assert set(results["coefficients"]) == {"audio", "visual", "fusion"}
    if method == "joint":
        assert results["coefficients"] == {"audio": 1.0, "visual": 1.0, "fusion": 1.0}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]["train"]) == {"audio", "visual", "fusion"}
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert any((out / "tensorboard").iterdir())


def test_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    main.main([*TINY, "--method", "joint", "--epochs", "1", "--out", str(out)])
    with pytest.raises(Exception, match="already holds a run"):
        main.main([*TINY, "--method", "joint", "--epochs", "1", "--out", str(out)])
