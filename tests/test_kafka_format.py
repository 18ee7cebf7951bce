"""Formatting a KRaft broker's storage works for every random cluster id, the ones starting with "-" included
(one in 64: base64url's "-" is value 62; passed as a separate argument the storage tool read it as an option)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_a_cluster_id_starting_with_a_dash_formats(tmp_path, monkeypatch):
    import services.manager as manager

    dashed = uuid.UUID(bytes=b"\xf8" + bytes(range(1, 16)))  # first 6 bits 111110 -> "-"
    monkeypatch.setattr(manager.uuid, "uuid4", lambda: dashed)
    jars = manager.ensure_kafka_jars(manager.ServiceConfig(run_dir=tmp_path, jars_dir=Path(
        os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")) / "kafka-jars-3.9.1"))
    data = tmp_path / "data"
    props = tmp_path / "server.properties"
    props.write_text("process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:1\n"
                     "listeners=PLAINTEXT://127.0.0.1:2,CONTROLLER://127.0.0.1:1\n"
                     f"controller.listener.names=CONTROLLER\nlog.dirs={data}\n")
    log4j = tmp_path / "log4j.properties"
    log4j.write_text("log4j.rootLogger=WARN\n")

    res = manager.format_kraft_storage(f"{jars.resolve()}/*", log4j, props, timeout=120)

    assert res.returncode == 0, res.stdout + res.stderr
    meta = dict(line.split("=", 1) for line in (data / "meta.properties").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert meta["cluster.id"].startswith("-")
