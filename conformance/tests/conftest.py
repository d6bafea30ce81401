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


# ---------------------------------------------------------------------------------------------
# SMART on FHIR: the second server run.sh starts with `--auth smart` (test_smart*.py)


@pytest.fixture(scope="session")
def smart_base():
    url = os.environ.get("SMART_BASE")
    if not url:
        pytest.fail("SMART_BASE is not set: run conformance/run.sh, which starts an --auth smart server")
    return url.rstrip("/")


@pytest.fixture(scope="session")
def smart_admin(smart_base):
    from smart_support import Admin

    token = os.environ.get("SMART_ADMIN_TOKEN")
    if not token:
        pytest.fail("SMART_ADMIN_TOKEN is not set: run conformance/run.sh")
    return Admin(smart_base, token)


@pytest.fixture(scope="session")
def smart_config(smart_base):
    r = requests.get(smart_base + "/.well-known/smart-configuration")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def smart_backend(smart_admin, smart_config):
    """A backend-services client (private_key_jwt, ES384) allowed system/*.cruds."""
    from smart_support import Backend

    return Backend(smart_admin, smart_config)


@pytest.fixture
def callback_server():
    from smart_support import CallbackServer

    server = CallbackServer()
    yield server
    server.close()


@pytest.fixture
def patient_user(smart_admin, smart_backend):
    """A Patient of its own and a user who logs in as that patient."""
    import secrets
    import types

    from smart_support import unique

    family = unique("Smart")
    patient = smart_backend.create({"resourceType": "Patient", "name": [{"family": family, "given": ["Pat"]}],
                                    "gender": "female", "birthDate": "1970-01-01"})
    username, password = unique("patient"), secrets.token_urlsafe(18)
    smart_admin.add_user(username, password, f"Patient/{patient['id']}")
    return types.SimpleNamespace(id=patient["id"], family=family, username=username, password=password)
