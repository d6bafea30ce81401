"""Shared fixtures: the base URL of the real server process that run.sh started."""
import os
import pathlib

import pytest
import requests

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def base():
    url = os.environ.get("FHIR_BASE")
    if not url:
        pytest.fail("FHIR_BASE is not set: run conformance/run.sh, which starts a server")
    return url.rstrip("/")


@pytest.fixture(scope="session")
def http():
    s = requests.Session()
    # Retry idempotent requests once if a pooled connection was closed under us, as any
    # production client would; a wrong answer still fails the test.
    retry = requests.adapters.Retry(total=2, connect=2, read=2, status=0, allowed_methods={"GET", "PUT", "DELETE"})
    s.mount("http://", requests.adapters.HTTPAdapter(max_retries=retry, pool_maxsize=16))
    s.headers.update({"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"})
    return s
