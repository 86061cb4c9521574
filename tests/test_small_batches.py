"""No batch of one can stop a run: a training split that leaves a trailing batch of one sample
(BatchNorm cannot take batch statistics of a single value per channel), a held-out split that
does the same, and a batch that unreadable clips shrink to one sample."""
import json

import pytest
import torch

import main
from tests.scaling_fixtures import TINY_FLAGS, tiny_avdigits
from utils.distributed_data import ShardedSampler


@pytest.fixture(scope="module")
def odd_avdigits(avdigits_default, tmp_path_factory):
    """25 train clips (batch 8: 8, 8, 8 and one), 9 val clips (held-out batch 8: 8 and one),
    17 test clips (evaluation batch 16: 16 and one)."""
    return tiny_avdigits(avdigits_default, tmp_path_factory.mktemp("odd") / "AVDigits", sizes=(25, 9, 17))


def test_trailing_batches_of_one_do_not_stop_training(odd_avdigits, tmp_path):
    # ResNet18 at --image-size 16 ends in 1x1 feature maps: a batch of one sample leaves
    # BatchNorm a single value per channel ("Expected more than 1 value per channel").
    out = tmp_path / "run"
    main.main([*TINY_FLAGS, "--data-root", odd_avdigits, "--encoder", "resnet18", "--method", "olm",
               "--epochs", "1", "--heldout-every", "1", "--reference-steps", "2", "--keep-checkpoints", "none",
               "--out", out])
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 3  # 25 clips at batch 8: three full batches, the trailing one dropped
    assert row["test"]["fusion"]["acc"] >= 0  # the trailing evaluation batch of one is scored


def sharded_batches(size, batch, min_last, world=1):
    sampler = ShardedSampler(size, torch.Generator().manual_seed(0), global_batch=batch * world,
                             min_last=min_last, rank=0, world=world)
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def test_sampler_drops_only_a_last_batch_below_its_minimum():
    assert [len(b) for b in sharded_batches(25, 8, min_last=2)] == [8, 8, 8]
    assert [len(b) for b in sharded_batches(26, 8, min_last=2)] == [8, 8, 8, 2]
    assert [len(b) for b in sharded_batches(26, 8, min_last=8)] == [8, 8, 8]
    assert [len(b) for b in sharded_batches(24, 8, min_last=8)] == [8, 8, 8]
    # Two ranks: 25 samples pad to 26, the last global batch gives each rank one sample.
    assert [len(b) for b in sharded_batches(25, 4, min_last=2, world=2)] == [4, 4, 4]
    assert [len(b) for b in sharded_batches(27, 4, min_last=2, world=2)] == [4, 4, 4, 2]
    # Every epoch drops other samples: none is left out for good.
    generator = torch.Generator().manual_seed(0)
    sampler = ShardedSampler(25, generator, global_batch=8, min_last=2, rank=0, world=1)
    assert set().union(*(set(sampler) for _ in range(20))) == set(range(25))
