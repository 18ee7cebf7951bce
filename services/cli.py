"""`velocity services up|down|status`."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Local Kafka (KRaft, single node) and Redis on 127.0.0.1, for development and tests.",
                  no_args_is_help=True)
console = Console()


def _config(run_dir: Path | None, kafka_port: int | None, redis_port: int | None):
    from services.manager import ServiceConfig

    return ServiceConfig(
        run_dir=run_dir or Path(os.environ.get("VELOCITY_RUN_DIR", ".velocity")),
        kafka_port=kafka_port or int(os.environ.get("VELOCITY_KAFKA_PORT", "9092")),
        controller_port=int(os.environ.get("VELOCITY_KAFKA_CONTROLLER_PORT", "0")) or (kafka_port or int(os.environ.get("VELOCITY_KAFKA_PORT", "9092"))) + 1,
        redis_port=redis_port or int(os.environ.get("VELOCITY_REDIS_PORT", "6379")),
        kafka_heap=os.environ.get("VELOCITY_KAFKA_HEAP", "512m"),
    )


RunDir = typer.Option(None, help="Run folder for config, data, logs and pids (env VELOCITY_RUN_DIR, default .velocity).")
KafkaPort = typer.Option(None, help="Kafka broker port (env VELOCITY_KAFKA_PORT, default 9092; controller = port+1).")
RedisPort = typer.Option(None, help="Redis port (env VELOCITY_REDIS_PORT, default 6379).")
RedisCluster = typer.Option(False, "--redis-cluster", help="Also a local three-master Redis Cluster (ports "
                            "--cluster-port to +2); point the components at it with VELOCITY_REDIS_CLUSTER=true "
                            "VELOCITY_REDIS_PORT=<cluster port>.")
ClusterPort = typer.Option(7000, envvar="VELOCITY_REDIS_CLUSTER_PORT", help="First port of the cluster's masters.")


@app.command()
def up(run_dir: Path = RunDir, kafka_port: int = KafkaPort, redis_port: int = RedisPort,
       redis_cluster: bool = RedisCluster, cluster_port: int = ClusterPort) -> None:
    """Start Redis and Kafka if they are not already running (idempotent); fetch Kafka jars on first use."""
    from services.manager import ServiceError
    from services.manager import up as services_up
    from services.redis_cluster import cluster_up

    cfg = _config(run_dir, kafka_port, redis_port)
    try:
        for line in services_up(cfg, echo=console.print):
            console.print(line)
        if redis_cluster:
            console.print(cluster_up(cfg, cluster_port))
    except ServiceError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"logs: {cfg.logs_dir}")


@app.command()
def down(run_dir: Path = RunDir, kafka_port: int = KafkaPort, redis_port: int = RedisPort,
         redis_cluster: bool = RedisCluster, cluster_port: int = ClusterPort) -> None:
    """Stop the services that `velocity services up` started (and only those)."""
    from services.manager import down as services_down
    from services.redis_cluster import cluster_down, started_cluster_ports

    cfg = _config(run_dir, kafka_port, redis_port)
    for line in services_down(cfg):
        console.print(line)
    if redis_cluster:
        for line in cluster_down(cfg, cluster_port):
            console.print(line)
    # Cluster nodes started elsewhere in this run directory (e.g. by the tests, on other ports) stop too.
    for port in started_cluster_ports(cfg):
        for line in cluster_down(cfg, port, masters=1):
            console.print(line)


@app.command()
def status(run_dir: Path = RunDir, kafka_port: int = KafkaPort, redis_port: int = RedisPort,
           redis_cluster: bool = RedisCluster, cluster_port: int = ClusterPort) -> None:
    """Show what runs where. Exit code 1 if a service is not answering."""
    from services.manager import status as services_status
    from services.redis_cluster import cluster_status

    table = Table()
    for col in ("service", "address", "state", "started by velocity", "log"):
        table.add_column(col)
    cfg = _config(run_dir, kafka_port, redis_port)
    rows = services_status(cfg) + (cluster_status(cfg, cluster_port) if redis_cluster else [])
    for s in rows:
        table.add_row(s.name, s.address, "[green]running[/]" if s.running else "[red]down[/]",
                      f"yes (pid {s.owned_pid})" if s.owned_pid else "no", str(s.log))
    console.print(table)
    if not all(s.running for s in rows):
        raise typer.Exit(1)


@app.command()
def acl(prefix: str = typer.Option("vel:", help="Key prefix the users may touch (VELOCITY_REDIS_KEY_PREFIX "
                                   "starts with it)."),
        reader_password: str = typer.Option(None, envvar="VELOCITY_REDIS_READER_PASSWORD",
                                            help="Password of velocity-reader (random if not given)."),
        writer_password: str = typer.Option(None, envvar="VELOCITY_REDIS_WRITER_PASSWORD",
                                            help="Password of velocity-writer (random if not given).")) -> None:
    """Print the ACL SETUSER commands for an external Redis: velocity-reader (the scorer) may only read feature
    keys; velocity-writer (stream worker, batch job) may write them; neither may flush or reconfigure."""
    from stores.redis_acl import commands_for, users

    for line in commands_for(users(reader_password, writer_password), prefix):
        print(line)
