"""`velocity services up|down|status`: a real single-node Kafka (KRaft) and a Redis server on 127.0.0.1.

Kafka's jars come from Maven Central through `mvn` (pinned in services/kafka/pom.xml) into a cache folder
that later runs reuse; Redis is the operating system's `redis-server`. Everything a run writes (config,
data, logs, pid files) lives in the run folder (`.velocity/` by default). `down` stops only processes
whose pid files this tool wrote, so a Redis or Kafka you started yourself is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from stores.processes import pid_alive
from stores.redis_acl import READER, WRITER

KAFKA_VERSION = "3.9.1"


class ServiceError(RuntimeError):
    """A service could not be installed or started; the message says what to do."""


@dataclass
class ServiceConfig:
    run_dir: Path
    kafka_port: int = 9092
    controller_port: int = 9093
    redis_port: int = 6379
    kafka_heap: str = "512m"
    jars_dir: Path | None = None

    @property
    def kafka_dir(self) -> Path:
        return self.run_dir / "kafka"

    @property
    def redis_dir(self) -> Path:
        return self.run_dir / "redis"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def kafka_jars(self) -> Path:
        return self.jars_dir or self.run_dir / f"kafka-jars-{KAFKA_VERSION}"


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate, deadline_s: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    hint = f"; see {log}" if log else ""
    raise ServiceError(f"{what} did not become ready within {deadline_s:.0f}s{hint}")


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _spawn(cmd: list[str], log: Path, pid_file: Path, cwd: Path | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, start_new_session=True,
        )
    pid_file.write_text(str(proc.pid))
    return proc.pid


# ---------------------------------------------------------------- Kafka


def ensure_kafka_jars(cfg: ServiceConfig, echo=print) -> Path:
    """Fetch the pinned broker jars with Maven once; later calls reuse the cache folder."""
    jars = cfg.kafka_jars
    marker = jars / ".complete"
    if marker.exists():
        return jars
    if not shutil.which("java"):
        raise ServiceError("Java is not installed. Install a JDK 17+ (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless).")
    if not shutil.which("mvn"):
        raise ServiceError("Maven is not installed; it fetches the Kafka jars. Install it (Debian/Ubuntu: apt-get install -y maven).")
    pom = resources.files("services").joinpath("kafka", "pom.xml")
    jars.mkdir(parents=True, exist_ok=True)
    echo(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central into {jars} (once) ...")
    with resources.as_file(pom) as pom_path:
        res = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
             f"-DoutputDirectory={jars.resolve()}", "-DincludeScope=runtime"],
            capture_output=True, text=True,
        )
    if res.returncode != 0 or not list(jars.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"mvn could not fetch the Kafka jars:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    marker.write_text(KAFKA_VERSION)
    return jars


def _kafka_properties(cfg: ServiceConfig) -> str:
    data = (cfg.kafka_dir / "data").resolve()
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{cfg.controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{cfg.kafka_port},CONTROLLER://127.0.0.1:{cfg.controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{cfg.kafka_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=4",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=8",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        # Replayed histories carry event-time timestamps from years ago: a time limit would delete them at the
        # next retention check. Size-bound instead (per partition), which suits a laptop.
        "log.retention.ms=-1",
        "log.retention.bytes=2147483648",
        "message.max.bytes=10485760",
        # The log cleaner (it compacts __consumer_offsets) allocates this buffer on the heap at start-up; Kafka's
        # 128 MB default made a laptop-sized heap (256-512 MB) fail with OutOfMemoryError now and then.
        "log.cleaner.dedupe.buffer.size=33554432",
        "",
    ])


def _log4j_properties(cfg: ServiceConfig) -> str:
    log = (cfg.logs_dir / "kafka-server.log").resolve()
    return "\n".join([
        "log4j.rootLogger=INFO, file",
        "log4j.appender.file=org.apache.log4j.RollingFileAppender",
        f"log4j.appender.file.File={log}",
        "log4j.appender.file.MaxFileSize=20MB",
        "log4j.appender.file.MaxBackupIndex=2",
        "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
        "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
        "log4j.logger.kafka=INFO",
        "log4j.logger.org.apache.kafka=INFO",
        "log4j.logger.state.change.logger=WARN",
        "",
    ])


def format_kraft_storage(classpath: str, log4j: Path, props: Path, extra: tuple[str, ...] = (),
                         timeout: float | None = None) -> subprocess.CompletedProcess:
    """Format a KRaft broker's storage under a new random cluster id (Kafka's StorageTool; `extra` e.g. SCRAM users).

    The id is base64url and starts with "-" one time in 64, so it is passed as `--cluster-id=ID`: as a separate
    argument the tool's parser takes it for an option and refuses to format."""
    import base64

    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")  # KRaft wants a base64url 16-byte id
    return subprocess.run(
        ["java", "-cp", classpath, f"-Dlog4j.configuration=file:{log4j.resolve()}",
         "kafka.tools.StorageTool", "format", f"--cluster-id={cid}", "-c", str(props.resolve()), *extra],
        capture_output=True, text=True, timeout=timeout,
    )


def kafka_up(cfg: ServiceConfig, echo=print) -> str:
    pid_file = cfg.kafka_dir / "kafka.pid"
    if port_open(cfg.kafka_port):
        owner = "started by velocity" if _read_pid(pid_file) else "not started by velocity"
        return f"Kafka already listening on 127.0.0.1:{cfg.kafka_port} ({owner})"
    jars = ensure_kafka_jars(cfg, echo)
    cfg.kafka_dir.mkdir(parents=True, exist_ok=True)
    props = cfg.kafka_dir / "server.properties"
    props.write_text(_kafka_properties(cfg))
    (cfg.kafka_dir / "log4j.properties").write_text(_log4j_properties(cfg))
    classpath = f"{jars.resolve()}/*"
    data = cfg.kafka_dir / "data"
    if not (data / "meta.properties").exists():
        res = format_kraft_storage(classpath, cfg.kafka_dir / "log4j.properties", props)
        if res.returncode != 0:
            raise ServiceError(f"formatting Kafka storage failed:\n{res.stdout}{res.stderr}")
    log = cfg.logs_dir / "kafka.out"
    cmd = [
        "java", f"-Xmx{cfg.kafka_heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{(cfg.kafka_dir / 'log4j.properties').resolve()}",
        f"-Dkafka.logs.dir={cfg.logs_dir.resolve()}",
        "-cp", classpath, "kafka.Kafka", str(props.resolve()),
    ]
    pid = _spawn(cmd, log, pid_file)
    _wait_for(lambda: _kafka_ready(cfg.kafka_port) or not pid_alive(pid), 90, "Kafka", log)
    if not pid_alive(pid):
        raise ServiceError(f"Kafka exited during start-up; see {log} and {cfg.logs_dir / 'kafka-server.log'}")
    return f"Kafka {KAFKA_VERSION} (KRaft) started on 127.0.0.1:{cfg.kafka_port}, pid {pid}"


def _kafka_ready(port: int) -> bool:
    if not port_open(port):
        return False
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()
    except Exception:
        return False


# ---------------------------------------------------------------- Redis


def redis_up(cfg: ServiceConfig) -> str:
    pid_file = cfg.redis_dir / "redis.pid"
    if port_open(cfg.redis_port):
        if _read_pid(pid_file):
            return (f"Redis already listening on 127.0.0.1:{cfg.redis_port} (started by velocity); "
                    f"ACL users in {redis_users(cfg)}")
        return f"Redis already listening on 127.0.0.1:{cfg.redis_port} (not started by velocity)"
    binary = shutil.which("redis-server")
    if not binary:
        raise ServiceError("redis-server is not installed. Debian/Ubuntu: sudo apt-get install -y redis-server; macOS: brew install redis.")
    cfg.redis_dir.mkdir(parents=True, exist_ok=True)
    log = cfg.logs_dir / "redis.log"
    cmd = [
        binary, "--port", str(cfg.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(cfg.redis_dir.resolve()), "--daemonize", "no", "--protected-mode", "yes",
    ]
    pid = _spawn(cmd, log, pid_file)
    _wait_for(lambda: _redis_ready(cfg.redis_port) or not pid_alive(pid), 20, "Redis", log)
    if not pid_alive(pid):
        raise ServiceError(f"Redis exited during start-up; see {log}")
    users_file = redis_users(cfg)
    return (f"Redis started on 127.0.0.1:{cfg.redis_port} (no persistence), pid {pid}; "
            f"ACL users {READER} (scorer) and {WRITER} (stream, batch) in {users_file}")


def redis_users(cfg: ServiceConfig, prefix: str = "vel:") -> Path:
    """Create the least-privilege users (stores.redis_acl) on the local Redis, with passwords kept in the run
    folder (mode 0600, created once) so that every `up` gives the same credentials. Returns the file."""
    import redis

    from stores.redis_acl import apply_users, users

    path = cfg.redis_dir / "users.env"
    known = {}
    if path.is_file():
        known = dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)
    accounts = users(known.get("READER_PASSWORD"), known.get("WRITER_PASSWORD"))
    apply_users(redis.Redis(port=cfg.redis_port, socket_timeout=2), accounts, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(f"READER_PASSWORD={accounts[0].password}\nWRITER_PASSWORD={accounts[1].password}\n")
    return path


def _redis_ready(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except Exception:
        return False


# ---------------------------------------------------------------- all


def up(cfg: ServiceConfig, echo=print) -> list[str]:
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    return [redis_up(cfg), kafka_up(cfg, echo)]


def _stop(pid_file: Path, name: str, grace_s: float) -> str:
    pid = _read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return f"{name}: not started by velocity (nothing to stop)"
    os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return f"{name}: stopped (pid {pid})"


def down(cfg: ServiceConfig) -> list[str]:
    return [
        _stop(cfg.kafka_dir / "kafka.pid", "Kafka", 30),
        _stop(cfg.redis_dir / "redis.pid", "Redis", 10),
    ]


@dataclass
class ServiceStatus:
    name: str
    address: str
    running: bool
    owned_pid: int | None
    log: Path


def status(cfg: ServiceConfig) -> list[ServiceStatus]:
    return [
        ServiceStatus("kafka", f"127.0.0.1:{cfg.kafka_port}", _kafka_ready(cfg.kafka_port),
                      _read_pid(cfg.kafka_dir / "kafka.pid"), cfg.logs_dir / "kafka-server.log"),
        ServiceStatus("redis", f"127.0.0.1:{cfg.redis_port}", _redis_ready(cfg.redis_port),
                      _read_pid(cfg.redis_dir / "redis.pid"), cfg.logs_dir / "redis.log"),
    ]
