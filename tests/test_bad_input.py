"""Mistakes a user can make, and data that is broken: each ends in one sentence naming the
flag or file (exit 2, no traceback) or is skipped and counted, and nothing written is lost."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from config import Config
from tests.scaling_fixtures import (TINY_FLAGS, VectorModel, assert_clean_failure, clips_of, full_avdigits,
                                    run_main, tiny_avdigits, vector_data)
from utils.errors import UserError


@pytest.fixture(scope="module")
def source(olm_cache):
    return full_avdigits(olm_cache), olm_cache


@pytest.fixture
def tiny(source, tmp_path, monkeypatch):
    """A fresh trimmed AV-Digits per test (tests break it in different ways)."""
    full, cache = source
    monkeypatch.setenv("OLM_CACHE", str(cache))
    return tiny_avdigits(full, tmp_path / "AVDigits")


def main_in_process(argv, capsys) -> tuple[int, str]:
    """main.py's entry point in this process: (exit code, the one 'error:' line or '')."""
    import main
    from utils.cli import run_cli

    try:
        run_cli(lambda: main.main([*TINY_FLAGS, *map(str, argv)]))
        code = 0
    except SystemExit as stop:
        code = stop.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if code else 0), errors
    return code, errors[0] if errors else ""


@pytest.mark.parametrize("argv, fragments", [
    (["--dataset", "NoSuchSet"], ["unknown dataset 'NoSuchSet'", "--dataset", "AVDigits"]),
    (["--method", "no_such_method"], ["unknown method 'no_such_method'", "--method", "olm"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--amp", "fp8"], ["--amp 'fp8'", "bf16"]),
    (["--resume", "no/such/run"], ["--resume no/such/run", "does not exist"]),
])
def test_bad_names_and_flags_end_in_one_sentence(tiny, tmp_path, capsys, argv, fragments):
    code, error = main_in_process([*argv, "--data-root", tiny, "--out", tmp_path / "run"], capsys)
    assert code == 2
    for fragment in fragments:
        assert fragment in error
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_data_root_names_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "CREMAD"
    code, error = main_in_process(["--dataset", "CREMAD", "--data-root", missing, "--out", tmp_path / "r"], capsys)
    assert code == 2 and str(missing) in error and "does not exist" in error


def test_empty_split_names_its_file(tiny, tmp_path, capsys):
    (tiny / "val.csv").write_text("")
    code, error = main_in_process(["--data-root", tiny, "--out", tmp_path / "run"], capsys)
    assert code == 2 and str(tiny / "val.csv") in error and "empty" in error


def test_corrupt_checkpoint_names_the_file(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"\x00not a checkpoint" * 64)
    code, error = main_in_process(["--data-root", tiny, "--resume", run], capsys)
    assert code == 2 and str(run / "last.pt") in error and "cannot be read" in error


def test_unreadable_and_missing_clips_are_skipped_and_counted(tiny, tmp_path, capsys, caplog):
    train = clips_of(tiny, "train")
    (tiny / "audio" / f"{train[0]}.wav").unlink()                       # missing: dropped at build
    (tiny / "audio" / f"{train[1]}.wav").write_bytes(b"RIFF garbage")   # unreadable: skipped per load
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        # In-process loading (--workers 0): a loader worker's log records never reach caplog.
        code, _ = main_in_process(["--data-root", tiny, "--epochs", 1, "--workers", 0, "--out", out], capsys)
    assert code == 0
    assert any("skipped 1 of 32 clips" in r.getMessage() for r in caplog.records)
    assert any(f"skipping clip {train[1]}" in r.getMessage() for r in caplog.records)
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["skipped_samples"] == 1
    assert json.loads((out / "results.json").read_text())["skipped_samples"] == 1


def test_too_many_missing_clips_is_fatal_and_says_so(tiny, tmp_path, capsys):
    for clip in clips_of(tiny, "train")[:3]:  # 3 of 32 > 5%
        (tiny / "audio" / f"{clip}.wav").unlink()
    code, error = main_in_process(["--data-root", tiny, "--max-missing", 0.05, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "skipped 3 of 32" in error and "--max-missing 5%" in error


def test_a_real_subprocess_fails_without_traceback(source, tmp_path):
    result = run_main(source[1], "--dataset", "NoSuchSet", "--out", tmp_path / "r", timeout=120)
    assert_clean_failure(result, "unknown dataset 'NoSuchSet'")


# -- feature files of the wrong width (MER loader) --------------------------------------------
def write_features(root, widths: dict[str, int], bad: str | None = None):
    """12 train and 4 test1 samples, (T, width) arrays per modality; ``bad`` gets width 5."""
    rows = []
    for i in range(16):
        name, split = f"s{i:02d}", "train" if i < 12 else "test1"
        rows.append(f"{name},{['neutral', 'angry', 'happy'][i % 3]},0.0,{split}\n")
        for modality, width in widths.items():
            folder = root / "features" / modality
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{name}.npy", np.ones((3, 5 if name == bad else width), np.float32))
    (root / "labels.csv").write_text("name,emo,val,split\n" + "".join(rows))


def test_feature_file_of_wrong_width_is_skipped_or_fatal(tmp_path, capsys, caplog):
    from datasets.mer import load_feature_data

    write_features(tmp_path, {"audio": 8, "visual": 8}, bad="s03")
    cfg = Config(modalities="audio,visual", audio_feature="audio", visual_feature="visual", max_missing=0.1)
    with caplog.at_level(logging.WARNING):
        data = load_feature_data(cfg, tmp_path)
    assert len(data.pool) == 11 and data.skipped["train"] == 1
    assert any("s03.npy" in r.getMessage() and "expected (T, 8)" in r.getMessage() for r in caplog.records)
    # Told the width is 6, every file is wrong: fatal, naming a file and the width.
    import main_trans
    from utils.cli import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main_trans.main(["--dataset", "MERMULTI", "--data-root", str(tmp_path), "--feature-dim", "6",
                                         "--audio-feature", "audio", "--visual-feature", "visual",
                                         "--device", "cpu", "--out", str(tmp_path / "run")]))
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "expected (T, 6)" in error and ".npy" in error and "Traceback" not in error


# -- a loss that becomes NaN ---------------------------------------------------------------------
class FailingModel(VectorModel):
    """Returns NaN logits from its ``fail_at``-th training forward on."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, inputs):
        logits = super().forward(inputs)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.fail_at:
                logits = {h: z * float("nan") for h, z in logits.items()}
        return logits


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    from olmbalance import build_method
    from engines.trainer import fit, make_loaders

    cfg = Config(epochs=3, batch_size=16, lr=1e-2, progress=False, plots=False, device="cpu")
    model = FailingModel(fail_at=8)  # 6 steps per epoch: fails in epoch 2
    method = build_method("olm", model.heads, reference_steps=2)
    loaders = make_loaders(cfg, vector_data(), torch.device("cpu"), method.needs_heldout)
    with pytest.raises(UserError) as stop:
        fit(cfg, model, method, loaders, tmp_path, torch.device("cpu"))
    message = str(stop.value)
    assert "nan" in message and "step 7" in message and f"{tmp_path / 'last.pt'} (epoch 1)" in message
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "results.json").exists()


def test_resuming_into_another_model_names_the_checkpoint(tmp_path):
    from olmbalance import build_method
    from engines.trainer import fit, make_loaders

    cfg = Config(epochs=1, batch_size=16, progress=False, plots=False, device="cpu")
    model = VectorModel()
    method = build_method("joint", model.heads)
    fit(cfg, model, method, make_loaders(cfg, vector_data(), torch.device("cpu"), False), tmp_path,
        torch.device("cpu"))
    other = VectorModel(classes=5)  # another head size: the saved weights do not fit
    cfg.resume, cfg.epochs = str(tmp_path), 2
    with pytest.raises(UserError) as stop:
        fit(cfg, other, build_method("joint", other.heads),
            make_loaders(cfg, vector_data(), torch.device("cpu"), False), tmp_path, torch.device("cpu"))
    assert f"--resume {tmp_path / 'last.pt'}" in str(stop.value) and "another model" in str(stop.value)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # left as it was
