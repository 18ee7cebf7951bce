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


def _script(svc: dict) -> str | None:
    """The shell script of an `sh -c` service, as the shell sees it (compose turns `$$` into `$`)."""
    if svc.get("entrypoint") != ["sh", "-c"]:
        return None
    cmd = svc.get("command", [])
    return (" ".join(cmd) if isinstance(cmd, list) else cmd).replace("$$", "$")


def _velocity_invocations(svc: dict) -> list[list[str]]:
    """The `velocity ...` argument lists a service runs (entrypoint velocity, or the `velocity` lines of an
    `sh -c` script, in order)."""
    script = _script(svc)
    if script is not None:
        words = (shlex.split(part) for part in re.split(r"&&|\|\||;|\n", script) if part.strip())
        return [w[1:] for w in words if w and w[0] == "velocity"]
    cmd = svc.get("command", [])
    return [cmd if isinstance(cmd, list) else shlex.split(cmd)]


def _one_shot(name: str, services: dict) -> bool:
    """Runs once and exits: under a profile (`docker compose run`), or waited for by another service until it
    completes."""
    return "profiles" in services[name] or any(
        (cond or {}).get("condition") == "service_completed_successfully"
        for svc in services.values() for dep, cond in (svc.get("depends_on") or {}).items() if dep == name)


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


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
        if _one_shot(name, services):
            assert svc.get("restart", "no") == "no", f"{name} runs once: it must not be restarted"
        else:  # everything else runs for good
            test = svc.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: needs a healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = (cond or {}).get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), \
                f"{name} -> {dep}: wait for a condition (service_started would not wait for anything)"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no check"
                assert not _one_shot(dep, services), f"{name} waits for one-shot {dep} to be healthy: never"
            else:
                assert _one_shot(dep, services), f"{name} waits for {dep} to complete, which runs for good"
            assert "profiles" not in services[dep] or services[dep]["profiles"] == svc.get("profiles"), \
                f"{name} depends on {dep}, which `docker compose up` does not start"


def test_up_comes_up_in_order(compose):
    """`docker compose up`: Kafka and Redis healthy -> bootstrap (generate, backfill, train) completed -> the stream
    worker and the API; `docker compose run demo` waits for the API and the worker."""
    services = compose["services"]
    default = {name for name, svc in services.items() if "profiles" not in svc}
    assert {"kafka", "redis", "bootstrap", "stream", "api"} <= default
    order, pending = [], set(default)
    while pending:  # a topological order of `up`, or a cycle
        ready = sorted(n for n in pending if set(services[n].get("depends_on") or {}) <= set(order))
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += ready
        pending -= set(ready)

    def waits(name: str, dep: str, condition: str) -> bool:
        return (services[name].get("depends_on") or {}).get(dep, {}).get("condition") == condition

    runs = [args[0] for args in _velocity_invocations(services["bootstrap"])]
    assert runs == ["generate", "batch", "train"], f"bootstrap runs {runs}"
    generate, batch, train = _velocity_invocations(services["bootstrap"])
    out = _flag(generate, "--out")
    assert out and out.startswith("/data/") and _flag(batch, "--history") == out and _flag(train, "--history") == out
    assert _flag(batch, "--start") and _flag(batch, "--end"), "bootstrap backfills a range of nights"
    assert "/data/models/CURRENT" in _script(services["bootstrap"]), "a current model skips the bootstrap"
    for name in ("bootstrap", "stream", "api", "demo"):
        for dep in ("kafka", "redis"):
            assert waits(name, dep, "service_healthy"), f"{name} must wait for {dep} to be healthy"
    for name in ("stream", "api"):
        assert waits(name, "bootstrap", "service_completed_successfully"), f"{name} must wait for the bootstrap"
    assert _velocity_invocations(services["api"])[0][:1] == ["serve"]
    assert _flag(_velocity_invocations(services["api"])[0], "--host") == "0.0.0.0"  # reachable from the host
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    demo = services["demo"]
    assert "profiles" in demo and _velocity_invocations(demo)[0][:1] == ["demo"]
    assert waits("demo", "api", "service_healthy") and waits("demo", "stream", "service_healthy")


def test_shell_scripts_parse(compose):
    import subprocess

    for name, svc in compose["services"].items():
        script = _script(svc)
        if script is not None:
            result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert result.returncode == 0, f"{name}: sh cannot parse its script: {result.stderr}"


def test_healthchecks_probe_the_port_the_service_listens_on(compose):
    for name, svc in _app_services(compose).items():
        url = next((w for w in svc.get("healthcheck", {}).get("test", []) if "://" in w), None)
        if url is None:
            continue
        port = re.match(r"https?://[^/:]+:(\d+)/", url)
        assert port, f"{name}: healthcheck URL {url} names no port"
        assert port.group(1) in _velocity_invocations(svc)[0], f"{name}: probes {port.group(1)}, listens elsewhere"


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
    assert checked >= 7


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
