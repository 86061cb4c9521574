"""One two-rank gloo session shared by every multi-process test.

Starting two processes and a process group costs seconds each time, so the multi-process
checks of several test files run in one spawn (the session fixture ``ddp_session`` in
conftest.py) and each test then asserts on what its part saved under its own sub-folder.
"""
from __future__ import annotations

from pathlib import Path

WORLD = 2


def worker(rank: int, store: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from tests import test_balancing_methods, test_distributed, test_guards

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for name, part in (("trainer", test_distributed.ddp_part), ("guards", test_guards.ddp_part),
                           ("balancing", test_balancing_methods.ddp_part)):
            folder = Path(out_dir) / name
            folder.mkdir(exist_ok=True)
            part(rank, WORLD, folder)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_session(out_dir: Path) -> Path:
    import torch.multiprocessing as mp

    # Forked, not spawned: the ranks inherit the test process's imports (torch and the test
    # modules), which spawned ranks would each repeat for seconds. CPU only (gloo), so fork is
    # safe here; torchrun's own start-up is covered by test_distributed's subprocess test.
    mp.start_processes(worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=True,
                       start_method="fork")
    return out_dir
