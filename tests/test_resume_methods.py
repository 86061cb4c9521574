"""Every registered method, resumed from the checkpoint of its first epoch, ends where an
uninterrupted run ends: weights, the method's own state (counters, estimates, copies,
teachers) and every logged number. A method whose state is missing from the checkpoint, or
restored wrong, fails here. (A real SIGKILL between epochs: tests/test_resume.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from config import Config
from engines.trainer import fit, make_loaders
from olmbalance import METHODS, build_method, method_entry
from tests.method_steps import step_model, step_settings
from tests.scaling_fixtures import vector_data
from tests.test_distributed import assert_identical
from tests.tiny import tiny_late_fusion

method_entry("olm")  # the registry filled
CPU = torch.device("cpu")


def default_model(seed):
    return tiny_late_fusion("concat", 3, 8, seed, inputs=4, batch_norm=True)


def run(name, folder, epochs, resume=False):
    settings = step_settings(name)
    prefix = method_entry(name).prefix
    cfg = Config(method=name, epochs=epochs, batch_size=16, heldout_batch_size=8, lr=1e-2, coef_lr=5e-2, seed=0,
                 progress=False, plots=False, device="cpu", resume=str(folder) if resume else None,
                 method_settings={f"{prefix}_{k}": v for k, v in settings.items()})
    model = step_model(name, default_model, inputs=4, classes=3)
    data = vector_data(train=48, val=16, test=16)
    method = build_method(name, model.heads, settings, steps_per_epoch=3, seed=0, epochs=epochs)
    method.setup(model)
    fit(cfg, model, method, make_loaders(cfg, data, CPU, method.needs_heldout), folder, CPU)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return model, method, [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_resumed_run_ends_like_an_uninterrupted_one(name, tmp_path):
    whole_model, whole_method, whole_rows = run(name, tmp_path / "whole", 2)
    run(name, tmp_path / "split", 1)
    model, method, rows = run(name, tmp_path / "split", 2, resume=True)
    assert_identical(model.state_dict(), whole_model.state_dict(), (name, "model"))
    assert_identical(method.state_dict(), whole_method.state_dict(), (name, "method"))
    assert rows == whole_rows
