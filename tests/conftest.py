"""Shared test setup: generated data goes to one temporary cache for the whole session, so
AV-Digits is materialized once and nothing is written to the user's home folder."""
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
