"""Exact resume: a run killed with SIGKILL and resumed ends with the numbers of an
uninterrupted run; checkpoints are atomic and load with ``weights_only=True``."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import torch

from tests.scaling_fixtures import REPO, TINY_FLAGS, main_command, script_env
from utils.checkpoint import save_atomic


@pytest.fixture(scope="module")
def tiny(tiny_avdigits, olm_cache):
    return tiny_avdigits, olm_cache


def comparable_results(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    if "imbalance" in results:  # wall time of the diagnostics: the only value allowed to differ
        results["imbalance"].pop("seconds", None)
    return {k: v for k, v in results.items() if k not in ("seconds", "run_dir")}


def comparable_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def kill_after_first_checkpoint(process: subprocess.Popen, run_dir, limit=240.0) -> None:
    """SIGKILL the run as soon as its first last.pt exists (the end of epoch 1)."""
    deadline = time.time() + limit
    while not (run_dir / "last.pt").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.kill()
    assert process.wait() == -9
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"


# One interrupted run covers it all (merged cases keep the suite short): loader workers, lr
# steps, a held-out pass every 3 steps across epoch boundaries (4 steps per epoch) and
# reference losses still being collected at the kill: all of it must come back. Only the
# victim needs its own process (to be SIGKILLed); the uninterrupted run trains in this one
# meanwhile, and the resume runs here too: a resume reads everything from the run folder.
def test_sigkill_then_resume_matches_uninterrupted_run(tiny, tmp_path):
    import main

    workers, epochs = 2, 3
    extra = ["--lr-step", "1", "--lr-gamma", "0.5", "--heldout-every", "3", "--reference-steps", "6"]
    root, cache = tiny
    flags = [str(f) for f in ("--data-root", root, "--epochs", epochs, "--seed", 3, "--workers", workers, *extra)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    victim = subprocess.Popen(main_command(*flags, "--out", killed), cwd=REPO, env=script_env(cache),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    failures = []

    def kill():
        try:
            kill_after_first_checkpoint(victim, killed)
        except BaseException as error:  # re-raised below: a thread's exception would be lost
            failures.append(error)
            victim.kill()

    watcher = threading.Thread(target=kill)
    watcher.start()
    main.main([*TINY_FLAGS, *flags, "--out", str(whole)])
    watcher.join()
    if failures:
        raise failures[0]
    # What the kill left must load, without pickled code, and be a finished epoch.
    payload = torch.load(killed / "last.pt", weights_only=True)
    assert 1 <= payload["epoch"] < epochs

    # The saved options are enough to resume: no other flag is repeated.
    main.main(["--resume", str(killed)])

    assert comparable_metrics(killed) == comparable_metrics(whole)
    assert comparable_results(killed) == comparable_results(whole)
    assert [row["epoch"] for row in comparable_metrics(killed)] == list(range(1, epochs + 1))
    assert not list(killed.glob(".last.pt.tmp-*")) and not list(killed.glob(".best.pt.tmp-*"))
    # best.pt (weights only) of the resumed run is the uninterrupted run's, bit for bit.
    best = [torch.load(run / "best.pt", weights_only=True) for run in (killed, whole)]
    assert best[0]["epoch"] == best[1]["epoch"] and best[0]["metrics"] == best[1]["metrics"]
    assert all(torch.equal(best[0]["model"][k], v) for k, v in best[1]["model"].items())


def write_checkpoints_forever(target: str, written) -> None:
    big = {"model": {"w": torch.arange(4_000_000, dtype=torch.float32)}, "epoch": 1}
    small = {"model": {"w": torch.zeros(10)}, "epoch": 2}
    for i in range(10_000):
        save_atomic(big if i % 2 == 0 else small, target)
        written.value = i + 1


def test_kill_during_checkpoint_writes_never_leaves_a_broken_file(tmp_path):
    import multiprocessing

    target = tmp_path / "last.pt"
    # A forked writer (no interpreter start-up to wait for), killed in the middle of its writes.
    context = multiprocessing.get_context("fork")
    written = context.Value("i", 0)
    writer = context.Process(target=write_checkpoints_forever, args=(str(target), written))
    writer.start()
    deadline = time.time() + 60
    while written.value < 5:  # let it finish a few writes, so the kill lands in a later one
        assert writer.is_alive() and time.time() < deadline, "the writer stopped early"
        time.sleep(0.005)
    writer.kill()
    writer.join()
    assert writer.exitcode == -9
    payload = torch.load(target, weights_only=True)
    assert payload["epoch"] in (1, 2)
    assert payload["model"]["w"].numel() == (4_000_000 if payload["epoch"] == 1 else 10)
    # A later save removes whatever temporary file the killed writer left.
    save_atomic({"model": {}, "epoch": 3}, target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert torch.load(target, weights_only=True)["epoch"] == 3


def test_resume_in_process_loading_restores_the_main_processs_random_state(tiny, tmp_path):
    # With --workers 0 the training frames are augmented in this process, from its global
    # random state: a resume that did not restore it would crop and flip differently.
    import main

    root, _ = tiny
    flags = [*TINY_FLAGS, "--data-root", str(root), "--seed", "5", "--augment", "--method", "joint"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    main.main([*flags, "--epochs", "2", "--out", str(whole)])
    main.main([*flags, "--epochs", "1", "--out", str(resumed)])
    torch.manual_seed(1234)  # whatever this process drew since, the resume must not see it
    main.main(["--resume", str(resumed), "--epochs", "2"])
    assert comparable_metrics(resumed) == comparable_metrics(whole)
