"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine here).

Every service must be something that can start: an official image or the app built from this repo, a healthcheck
for whatever runs long, dependencies that exist, ports that do not clash, and app commands that the `velocity`
CLI really has, with flags it accepts. Files the Dockerfile copies must exist.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO

pytestmark = pytest.mark.unit

OFFICIAL_IMAGES = {"apache/kafka": "3.9.1", "redis": None}  # Kafka pinned to the release the local path runs


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _app_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def _velocity_invocations(svc: dict) -> list[list[str]]:
    """The `velocity ...` argument lists a service runs (entrypoint velocity, or `sh -c` command lines)."""
    cmd = svc.get("command", [])
    if svc.get("entrypoint") == ["sh", "-c"]:
        script = " ".join(cmd) if isinstance(cmd, list) else cmd
        return [shlex.split(part)[1:] for part in re.split(r"&&|;", script) if part.strip()]
    return [cmd if isinstance(cmd, list) else shlex.split(cmd)]


def test_every_service_is_an_official_image_or_the_app_built_here(compose):
    assert {"kafka", "redis", "stream"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = REPO / (svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"])
            assert (context / "Dockerfile").is_file(), f"{name}: no Dockerfile in its build context"
            continue
        image, _, tag = svc["image"].partition(":")
        assert image in OFFICIAL_IMAGES, f"{name}: {image} is not an official image"
        assert tag and tag != "latest", f"{name}: image tag must be pinned"
        if OFFICIAL_IMAGES[image]:
            assert tag == OFFICIAL_IMAGES[image], f"{name}: {image} must match the local path's release"


def test_long_running_services_have_healthchecks_and_dependencies_exist(compose):
    services = compose["services"]
    for name, svc in services.items():
        if "profiles" not in svc:  # one-shot jobs run under a profile; everything else runs for good
            test = svc.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: needs a healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no check"


def test_published_ports_are_unique_and_match_what_listens(compose):
    published: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for spec in svc.get("ports", []):
            host, _, container = str(spec).rpartition(":")
            # Kafka and Redis run without authentication: published on the loopback interface only.
            assert host.startswith("127.0.0.1:"), f"{name}: publishes {spec} on every interface, bind 127.0.0.1"
            assert host not in published, f"{name} and {published.get(host)} both publish {host}"
            published[host] = name
            if name in _app_services(compose):
                args = _velocity_invocations(svc)[0]
                assert container in args, f"{name}: publishes {container} but its command does not listen there"
    kafka = compose["services"]["kafka"]["environment"]
    assert "HOST://:9092" in kafka["KAFKA_LISTENERS"] and "127.0.0.1:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]


def test_app_commands_exist_in_the_cli_and_accept_their_flags(compose):
    from velocity_cli import app

    runner = CliRunner()
    checked = 0
    for name, svc in _app_services(compose).items():
        for args in _velocity_invocations(svc):
            words = [a for a in args if not a.startswith("-")][:1]
            result = runner.invoke(app, [*words, "--help"])
            assert result.exit_code == 0, f"{name}: `velocity {words[0]}` is not a command:\n{result.output}"
            flags = {a.split("=")[0] for a in args if a.startswith("--")}
            for flag in flags:
                assert flag in result.output, f"{name}: `velocity {words[0]}` has no flag {flag}"
            checked += 1
    assert checked >= 3


def test_app_environment_points_at_the_compose_services(compose):
    from featurestore.config import KafkaSettings, RedisSettings, Settings

    known = ({f"VELOCITY_{k.upper()}" for k in Settings.model_fields}
             | {f"VELOCITY_KAFKA_{k.upper()}" for k in KafkaSettings.model_fields}
             | {f"VELOCITY_REDIS_{k.upper()}" for k in RedisSettings.model_fields})
    services = compose["services"]
    for name, svc in _app_services(compose).items():
        env = svc["environment"]
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        host, port = env["VELOCITY_KAFKA_BOOTSTRAP"].split(":")
        assert host in services and f"INTERNAL://{host}:{port}" in services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert env["VELOCITY_REDIS_HOST"] in services


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in {p.split(".")[0] for p in declared}:  # the image holds every package the install declares
        assert re.search(rf"^COPY {package} ", text, re.M), f"the image lacks the {package} package"
    assert 'ENTRYPOINT ["velocity"]' in text
    assert "requirements.lock" in text  # the same pinned set as `make install`
