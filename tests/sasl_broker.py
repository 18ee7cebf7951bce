"""A private single-node KRaft broker whose client listener wants SASL/SCRAM-SHA-256 (SASL_PLAINTEXT), for tests.

Same jars and start-up as `velocity services up` (services/manager.py); the SCRAM users are created when the storage
is formatted (`kafka-storage format --add-scram`), so the broker needs no running cluster to create them.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

ADMIN = ("admin", "admin-" + uuid.uuid4().hex[:12])


@dataclass
class SaslBroker:
    folder: Path
    port: int
    controller_port: int
    users: dict[str, str]
    pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        """What every Velocity client needs to reach this broker as `user`."""
        return {"VELOCITY_KAFKA_BOOTSTRAP": self.bootstrap, "VELOCITY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "VELOCITY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "VELOCITY_KAFKA_SASL_USERNAME": user,
                "VELOCITY_KAFKA_SASL_PASSWORD": self.users[user] if password is None else password}

    def _properties(self) -> str:
        admin_user, admin_pw = ADMIN
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms=SCRAM-SHA-256",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256",
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{admin_user}" password="{admin_pw}";',
            f"log.dirs={(self.folder / 'data').resolve()}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.retention.ms=-1",
            "log.cleaner.dedupe.buffer.size=33554432",
            "",
        ])

    def start(self) -> SaslBroker:
        from services.manager import ServiceConfig, ensure_kafka_jars, format_kraft_storage

        jars = ensure_kafka_jars(ServiceConfig(run_dir=self.folder, jars_dir=Path(
            os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")) / "kafka-jars-3.9.1"))
        self.folder.mkdir(parents=True, exist_ok=True)
        props = self.folder / "server.properties"
        props.write_text(self._properties())
        log4j = self.folder / "log4j.properties"
        log4j.write_text("log4j.rootLogger=WARN, file\nlog4j.appender.file=org.apache.log4j.FileAppender\n"
                         f"log4j.appender.file.File={(self.folder / 'server.log').resolve()}\n"
                         "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
                         "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n")
        cp = f"{jars.resolve()}/*"
        scram = []
        for name, password in {ADMIN[0]: ADMIN[1], **self.users}.items():
            scram += ["--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]"]
        res = format_kraft_storage(cp, log4j, props, tuple(scram), timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"kafka-storage format failed: {res.stdout}{res.stderr}")
        with open(self.folder / "kafka.out", "ab") as out:
            proc = subprocess.Popen(["java", "-Xmx256m", "-Xms64m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                                     f"-Dlog4j.configuration=file:{log4j.resolve()}", "-cp", cp, "kafka.Kafka",
                                     str(props.resolve())], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        self._proc = proc
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the SASL broker exited: {(self.folder / 'kafka.out').read_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.5)
        raise RuntimeError("the SASL broker did not become ready in 120 s")

    def admin(self):
        from kafka import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000,
                                security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                                sasl_plain_username=ADMIN[0], sasl_plain_password=ADMIN[1])

    def _ready(self) -> bool:
        try:
            admin = self.admin()
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
