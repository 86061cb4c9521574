"""Shared test setup: generated data goes to one temporary cache for the whole session, so
AV-Digits is materialized once and nothing is written to the user's home folder; end-to-end
tests train on a trimmed copy of it (``tiny_avdigits``)."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def olm_cache(tmp_path_factory):
    previous = os.environ.get("OLM_CACHE")
    path = tmp_path_factory.mktemp("olm_cache")
    os.environ["OLM_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("OLM_CACHE", None)
    else:
        os.environ["OLM_CACHE"] = previous


@pytest.fixture(scope="session")
def avdigits_default(olm_cache):
    """AV-Digits with the default knobs, materialized once per session (tests must not
    rebuild it in place)."""
    from tests.scaling_fixtures import full_avdigits

    return full_avdigits(olm_cache)


@pytest.fixture(scope="session")
def tiny_avdigits(avdigits_default, tmp_path_factory):
    """A trimmed AV-Digits (32 train, 16 val, 16 test clips) for --data-root, built once."""
    from tests.scaling_fixtures import tiny_avdigits as trim

    return trim(avdigits_default, tmp_path_factory.mktemp("tiny-session") / "AVDigits")


@pytest.fixture(scope="session")
def ddp_session(tmp_path_factory):
    """The folder where the shared two-rank session (tests/ddp_session.py) saved its parts."""
    from tests.ddp_session import run_session

    return run_session(tmp_path_factory.mktemp("ddp-session"))
