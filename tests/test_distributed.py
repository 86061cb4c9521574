"""Multi-process training on CPU (gloo): sharding, identical OLM coefficients on every rank,
validation/test that score each sample once, and torchrun on main.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from config import Config
from engines.engines_logits_com import StepContext, evaluate
from tests.scaling_fixtures import (REPO, TINY_FLAGS, VectorModel, full_avdigits, script_env, tiny_avdigits,
                                    vector_data)
from utils.distributed_data import ShardedSampler

WORLD = 2
# OLM; a method that leaves parameters unused (DDP must be told); one that edits gradients
# after backward from statistics every rank must share (OGM-GE on detached read-out heads).
METHODS = ("olm", "audio_only", "ogm_ge")


# -- the sampler ---------------------------------------------------------------------------------
def test_eval_shards_score_every_sample_exactly_once():
    for size in (1, 30, 31):
        shards = [list(ShardedSampler(size, pad=False, rank=r, world=3)) for r in range(3)]
        assert sorted(i for shard in shards for i in shard) == list(range(size))
        assert [len(s) for s in shards] == [len(ShardedSampler(size, pad=False, rank=r, world=3)) for r in range(3)]


def test_train_shards_rebuild_the_single_process_global_batches():
    size, per_rank = 37, 4
    single = list(ShardedSampler(size, torch.Generator().manual_seed(5), global_batch=per_rank * WORLD,
                                 rank=0, world=1))
    # One process with a generator draws exactly what RandomSampler draws.
    assert single == list(RandomSampler(range(size), generator=torch.Generator().manual_seed(5)))
    shards = [list(ShardedSampler(size, torch.Generator().manual_seed(5), global_batch=per_rank * WORLD,
                                  rank=r, world=WORLD)) for r in range(WORLD)]
    assert len(shards[0]) == len(shards[1]) == 19  # equal batch counts: padded by one sample
    padded = single + single[:1]
    for step in range(0, 19, per_rank):
        together = shards[0][step:step + per_rank] + shards[1][step:step + per_rank]
        assert together == padded[2 * step:2 * step + len(together)]


# -- two ranks in-process --------------------------------------------------------------------------
def ddp_part(rank: int, world: int, out_dir: Path) -> None:
    """This file's share of the two-rank session (tests/ddp_session.py)."""
    from olmbalance import build_method
    from engines.trainer import fit, make_loaders
    from utils import distributed
    from utils.seed import seed_everything

    for method_name in METHODS:
        cfg = Config(method=method_name, epochs=2, batch_size=16, heldout_batch_size=8, lr=1e-2,
                     coef_lr=5e-2, seed=0, progress=False, plots=False, device="cpu")
        seed_everything(cfg.seed)
        data = vector_data()
        model = VectorModel()
        method = build_method(method_name, model.heads, reference_steps=3)
        loaders = make_loaders(cfg, data, torch.device("cpu"), method.needs_heldout)
        run_dir = Path(out_dir) / method_name
        run_dir.mkdir(exist_ok=True)
        fit(cfg, model, method, loaders, run_dir, torch.device("cpu"))
        test_count = distributed.all_reduce_sum(evaluate(model, loaders.test, model.heads, StepContext(
            device=torch.device("cpu"), network_optimizer=None, progress=False)).count)
        torch.save({"model": model.state_dict(), "method": method.state_dict(), "test_count": test_count},
                   Path(out_dir) / f"{method_name}-rank{rank}.pt")


def assert_identical(a, b, where):
    """Equal tensors, bit for bit, through nested dicts (a method's extra state is a dict)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], (*where, key))
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def single_process_metrics(model, dataset, heads):
    loader = DataLoader(dataset, batch_size=7, collate_fn=vector_data().collate_fn)
    ctx = StepContext(device=torch.device("cpu"), network_optimizer=None, progress=False)
    return evaluate(model, loader, heads, ctx).compute()


def assert_same_metrics(logged: dict, computed: dict):
    for head, values in computed.items():
        assert logged[head]["acc"] == values["acc"] and logged[head]["f1"] == values["f1"], head
        assert logged[head]["loss"] == pytest.approx(values["loss"], rel=1e-5), head


def test_two_ranks_keep_identical_coefficients_and_evaluate_like_one_process(ddp_session):
    tmp_path = ddp_session / "trainer"
    for method_name in METHODS:
        ranks = [torch.load(tmp_path / f"{method_name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for part in ("model", "method"):
            assert_identical(ranks[0][part], ranks[1][part], (method_name, part))
        assert ranks[0]["test_count"] == 31  # 31 test samples on 2 ranks: none repeated
        run_dir = tmp_path / method_name
        assert len(list((run_dir / "tensorboard").iterdir())) == 1  # rank 0 alone logs
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 12  # 96 / 16 per epoch
        model = VectorModel()
        model.load_state_dict(torch.load(run_dir / "last.pt", weights_only=True)["model"])
        data = vector_data()
        assert_same_metrics(rows[-1]["val"], single_process_metrics(model, data.val, model.heads))
        assert_same_metrics(rows[-1]["test"], single_process_metrics(model, data.test, model.heads))
    olm_state = torch.load(tmp_path / "olm-rank0.pt", weights_only=True)["method"]
    assert not torch.allclose(olm_state["modulator.coefficients"], torch.ones(3))  # OLM did move them
    assert olm_state["modulator.reference_count"] == 3


# -- torchrun on the real entry point ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "scaling-cache"
    return tiny_avdigits(full_avdigits(cache), tmp_path_factory.mktemp("tiny") / "AVDigits"), cache


def test_torchrun_main_writes_once_and_matches_a_single_process_evaluation(tiny, tmp_path, monkeypatch):
    from config import build_parser, get_dataset_spec, resolve_config
    from datasets.builders import build_data
    from models.encoders import late_fusion_model

    root, cache = tiny
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--data-root", str(root), "--epochs", "1", "--workers", "1", "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={WORLD}", str(REPO / "main.py"), *flags],
                            cwd=REPO, env=script_env(cache), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # rank 0 alone reports
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 4  # 32 clips, global batch 8: 4 steps, each rank loading 4 clips

    monkeypatch.setenv("OLM_CACHE", str(cache))
    cfg = resolve_config(build_parser("test").parse_args(flags))
    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    model = late_fusion_model(cfg, len(data.class_names), data.modalities)  # as main.py builds it
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    ctx = StepContext(device=torch.device("cpu"), network_optimizer=None, progress=False)
    for split in ("val", "test"):
        loader = DataLoader(getattr(data, split), batch_size=16, collate_fn=data.collate_fn)
        assert_same_metrics(row[split], evaluate(model, loader, model.heads, ctx).compute())
