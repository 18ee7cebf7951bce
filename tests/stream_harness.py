"""Run `velocity stream` as a real subprocess and observe it from outside, as an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.helpers import wait_until

SECRET = "stream-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, *, topic: str, prefix: str, group: str, offline: Path, bootstrap: str,
                 redis_port: int, log: Path, retention_ms: int | None = None, score: dict | None = None) -> None:
        self.args = [sys.executable, "-m", "velocity_cli", "stream", "--topic", topic, "--dlq-topic", f"{topic}.dlq",
                     "--group", group, "--key-prefix", prefix, "--offline-dir", str(offline),
                     "--labels-topic", f"{topic}.labels", "--labels-dlq-topic", f"{topic}.labels.dlq",
                     "--batch-size", "500", "--log-level", "info"]
        if retention_ms is not None:  # reading old transactions back after a replay needs their events online
            self.args += ["--retention-ms", str(retention_ms)]
        # Scoring is off unless a test asks for it with its own topics and model directory (never the shared ones).
        if score is None:
            self.args += ["--no-score"]
        else:
            self.args += ["--scores-topic", score["scores"], "--alerts-topic", score["alerts"],
                          "--models-dir", str(score["models_dir"])]
        self.env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap,
                    "VELOCITY_REDIS_PORT": str(redis_port), "VELOCITY_RUN_DIR": str(offline / "run")}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.port = free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*self.args, "--metrics-port", str(self.port)], env=self.env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    def metric(self, name: str) -> float | None:
        import urllib.request

        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def committed_all(admin, group: str, topic: str, bootstrap: str) -> bool:
    """True once the group's committed offsets reach the end of every partition of `topic`."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except KafkaError:  # e.g. a fresh broker still creating __consumer_offsets: not committed yet
        return False
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
    finally:
        consumer.close()
    # A partition that never received a message has nothing to commit.
    return bool(ends) and all((offsets[tp].offset if tp in offsets else 0) >= end for tp, end in ends.items())


def stable_members(admin, group: str) -> int:
    """Members of a consumer group once it is Stable (a rebalance finished), else 0."""
    from kafka.errors import KafkaError

    try:
        info = admin.describe_groups([group]).get(group, {})
    except KafkaError:
        return 0
    return len(info.get("members") or []) if info.get("group_state") == "Stable" else 0


def wait_committed(admin, worker: Worker, group: str, topic: str, bootstrap: str, timeout: float = 120) -> None:
    def done():
        assert worker.alive(), f"worker exited:\n{worker.tail()}"
        return committed_all(admin, group, topic, bootstrap)

    wait_until(done, timeout=timeout, interval=0.25, what=f"group {group} to commit all of {topic}")
