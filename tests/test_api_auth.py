"""Optional bearer-token auth on the API (issue 17 section 3): every route tried with and without the token on a
real server process, the fast path included; the checker itself; and a bad token setting refused in one line."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pytest

from tests.api_harness import isolated_api
from tests.conftest import REPO
from tests.synthetic import luhn_pan

TOKEN = "t0k3n-" + uuid.uuid4().hex
WRONG = "wr0ng-" + uuid.uuid4().hex
PAN = luhn_pan(np.random.default_rng(3))
#: Open without a token by default (SPEC-free decision documented in README: probes and scrapers).
OPEN = {"/healthz", "/readyz", "/metrics"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def api(services, kafka_admin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    token_file = folder / "token"
    token_file.write_text(f"\n{TOKEN}\n")
    with isolated_api(services, kafka_admin, folder, "auth", env={"VELOCITY_API_TOKEN_FILE": str(token_file)}) as a:
        yield a


def _routes(client: httpx.Client) -> list[tuple[str, str]]:
    """Every documented route (from /openapi.json), with a concrete path, plus the dashboard's undocumented ones."""
    schema = client.get("/openapi.json", headers=bearer(TOKEN)).json()
    routes = []
    for path, ops in schema["paths"].items():
        concrete = path.replace("{card}", "0" * 32).replace("{name}", "x.png")
        routes += [(method.upper(), concrete) for method in ops]
    routes += [("GET", "/"), ("GET", "/dashboard/model"), ("GET", "/docs"), ("GET", "/openapi.json")]
    return routes


def _request(client: httpx.Client, method: str, path: str, headers: dict) -> httpx.Response:
    body = None
    if method == "POST":
        body = ([{"txn_id": uuid.uuid4().hex, "cc_num": PAN, "amount": 12.5, "merchant": "m", "category": "c"}]
                if path.endswith("/batch") else
                {"txn_id": uuid.uuid4().hex, "cc_num": PAN, "amount": 12.5, "merchant": "m", "category": "c"})
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.integration
def test_every_route_needs_the_token_except_the_open_ones(api):
    client: httpx.Client = api["client"]
    routes = _routes(client)
    assert ("POST", "/v1/score") in routes and ("GET", "/") in routes and len(routes) >= 10
    for method, path in routes:
        with_token = _request(client, method, path, bearer(TOKEN))
        assert with_token.status_code != 401, (method, path, with_token.text)
        for headers in ({}, bearer(WRONG), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            r = _request(client, method, path, headers)
            if path in OPEN:
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert r.json()["error"] == "unauthorized"


@pytest.mark.integration
def test_the_fast_path_and_its_framework_twin_are_both_guarded(api):
    client: httpx.Client = api["client"]
    req = {"txn_id": uuid.uuid4().hex, "cc_num": PAN, "amount": 12.5, "merchant": "m", "category": "c"}
    for query in ("", "?publish=false", "?publish=0"):  # answered by serving/fastpath.py
        assert client.post(f"/v1/score{query}", json=req).status_code == 401
        assert client.post(f"/v1/score{query}", json=req, headers=bearer(TOKEN)).status_code == 200
    # FastAPI's route (a query string the fast path does not take): guarded the same way.
    assert client.post("/v1/score?publish=false&x=1", json=req).status_code == 401
    assert client.post("/v1/score?publish=false&x=1", json=req, headers=bearer(TOKEN)).status_code == 200
    assert client.post("/v1/score", json=req, headers={"authorization": f"bearer {TOKEN}"}).status_code == 200


@pytest.mark.integration
def test_the_dashboard_takes_basic_with_the_token_as_password_for_browsers(api):
    client: httpx.Client = api["client"]
    r = client.get("/")
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
    ok = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    bad = base64.b64encode(f"anyone:{WRONG}".encode()).decode()
    assert client.get("/", headers={"Authorization": f"Basic {ok}"}).status_code == 200
    assert client.get("/", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    # Basic is for the browser page only: the API wants the bearer token.
    req = {"txn_id": uuid.uuid4().hex, "cc_num": PAN, "amount": 12.5, "merchant": "m", "category": "c"}
    assert client.post("/v1/score", json=req, headers={"Authorization": f"Basic {ok}"}).status_code == 401


@pytest.mark.integration
def test_no_token_is_ever_logged_and_denials_are_counted(api):
    client: httpx.Client = api["client"]
    client.get("/v1/features/" + "0" * 32, headers=bearer(WRONG))
    client.post("/v1/score", json={}, headers=bearer(WRONG + "-again"))
    metrics = client.get("/metrics").text
    assert 'velocity_api_errors_total{kind="unauthorized"}' in metrics
    log = (api["folder"] / "server.log").read_text()
    assert WRONG not in log and TOKEN not in log
    assert " 401" in log  # the denials themselves are in the access log, without the header


@pytest.mark.unit
def test_checker_compares_every_token_and_keeps_probes_open_unless_told():
    import asyncio

    from serving.auth import BearerAuth, load_tokens

    a, b = b"a" * 20, b"b" * 20
    auth = BearerAuth([a, b])

    def scope(path: str, header: bytes | None) -> dict:
        return {"type": "http", "path": path, "headers": [(b"authorization", header)] if header else []}

    assert auth.allows(scope("/v1/score", b"Bearer " + a)) and auth.allows(scope("/v1/score", b"Bearer " + b))
    assert not auth.allows(scope("/v1/score", b"Bearer " + a[:-1]))
    assert not auth.allows(scope("/v1/score", b"Bearer " + a + b"x"))
    assert not auth.allows(scope("/v1/score", b"Bearer"))
    assert not auth.allows(scope("/", b"Basic !!notbase64"))
    assert all(auth.allows(scope(p, None)) for p in ("/healthz", "/readyz", "/metrics"))
    strict = BearerAuth([a], protect_ops=True)
    assert strict.allows(scope("/healthz", None))
    assert not strict.allows(scope("/readyz", None)) and not strict.allows(scope("/metrics", None))
    sent = []

    async def send(msg):
        sent.append(msg)

    asyncio.run(strict.deny(scope("/v1/score", None), send))
    assert sent[0]["status"] == 401 and (b"www-authenticate", b'Bearer realm="velocity"') in sent[0]["headers"]
    assert load_tokens(None, None) == []
    with pytest.raises(ValueError, match="at least 16"):
        load_tokens("short", None)


@pytest.mark.e2e
def test_an_unreadable_token_file_is_one_clear_line(tmp_path):
    env = {**os.environ, "VELOCITY_API_TOKEN_FILE": str(tmp_path / "missing")}
    r = subprocess.run([sys.executable, "-m", "velocity_cli", "serve", "--port", "1"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and "entity secret" not in line.lower()]
    assert lines[-1].startswith("error: cannot read VELOCITY_API_TOKEN_FILE") and "Traceback" not in r.stderr
