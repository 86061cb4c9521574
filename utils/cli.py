"""Entry-point wrapper: a user's mistake ends in one sentence and a non-zero exit."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from utils.errors import UserError


def run_cli(main: Callable[[], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run_on_every_rank(cfg, run: Callable[[object], dict]) -> dict | None:
    """Run ``run(cfg)`` in this process's torchrun group (or alone); return its results on the
    process that reports (rank 0), None on the others."""
    from utils import distributed
    from utils.distributed_setup import distributed_session

    with distributed_session(cfg):
        results = run(cfg)
    return results if distributed.is_main() else None
