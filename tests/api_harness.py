"""One `velocity serve` process for a test module, isolated from every other test: its own Redis key prefix,
Kafka topics and model directory, removed afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import REPO
from tests.helpers import wait_until
from tests.toy_models import save_model, toy_booster

SECRET = "serving-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *, env: dict, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_SERVE_MODEL_POLL_S": "0.1",
                    "VELOCITY_SERVE_KAFKA_RETRY_S": "1", **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "velocity_cli", "serve", "--port", str(self.port)],
                env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._up(), timeout=60, what="the server to answer /healthz")
        return self

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def isolated_api(services: dict, kafka_admin, folder: Path, name: str, *, topics=("transactions", "scores"),
                 env: dict | None = None, threshold: float | None = None) -> Iterator[dict]:
    """A started server with a toy model `v1`, topics `test.<name>.<tag>[.<kind>]` and prefix `test:<name>:<tag>`;
    yields server, client, prefix, topics, models, env, folder and bootstrap."""
    from kafka.admin import NewTopic

    from featurestore.config import RedisSettings
    from stores.kafka_topics import topic_configs
    from stores.redis_online import delete_prefix

    tag = uuid.uuid4().hex[:10]
    names = {kind: f"test.{name}.{tag}" + ("" if kind == "transactions" else f".{kind}") for kind in topics}
    kafka_admin.create_topics([NewTopic(t, 2, 1, topic_configs=topic_configs()) for t in names.values()])
    prefix = f"test:{name}:{tag}"
    models = folder / "models"  # $VELOCITY_DATA_DIR/models, model.registry's layout
    save_model(models, "v1", toy_booster(1), **({} if threshold is None else {"threshold": threshold}))
    full_env = {"VELOCITY_REDIS_KEY_PREFIX": prefix, "VELOCITY_REDIS_PORT": str(services["redis_port"]),
                "VELOCITY_KAFKA_BOOTSTRAP": services["bootstrap"], "VELOCITY_DATA_DIR": str(folder),
                **{f"VELOCITY_KAFKA_TOPIC_{kind.upper()}": topic for kind, topic in names.items()}, **(env or {})}
    server = Server(env=full_env, log=folder / "server.log").start()
    client = httpx.Client(base_url=server.url, timeout=10)
    try:
        wait_until(lambda: client.get("/readyz").json()["kafka"]["state"] == "connected", timeout=60,
                   what="the server's Kafka producer")
        yield {"server": server, "client": client, "prefix": prefix, "topics": names, "models": models,
               "env": full_env, "folder": folder, "bootstrap": services["bootstrap"]}
    finally:
        client.close()
        server.stop()
        from stores.redis_cluster_store import sync_client

        r = sync_client(RedisSettings(port=services["redis_port"]))  # a cluster client under VELOCITY_REDIS_CLUSTER
        delete_prefix(r, prefix)
        r.close()
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics(list(names.values()))
