"""`velocity services up --redis-cluster`: a local three-master Redis Cluster from the same `redis-server` binary.

Each master runs on its own port (7000-7002 by default) with `--cluster-enabled yes`, no persistence and its own
folder under the run folder (`redis-cluster/<port>/`, which holds its `nodes.conf` and pid file). The cluster is
created once with `redis-cli --cluster create ... --cluster-replicas 0`; a later `up` finds it formed and leaves it.
The least-privilege ACL users (stores.redis_acl) are applied on every master (ACLs are per node in Redis Cluster),
with the passwords the single-node Redis uses (`redis/users.env`). `down` stops only the masters this tool started.

Point every component at it with `VELOCITY_REDIS_CLUSTER=true` and `VELOCITY_REDIS_PORT=7000` (any master is a
seed: the clients discover the others).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from services.manager import ServiceConfig, ServiceError, _read_pid, _spawn, _stop, _wait_for, port_open

#: Default first port of the local cluster's masters.
CLUSTER_PORT = 7000
MASTERS = 3


def node_dir(cfg: ServiceConfig, port: int) -> Path:
    return cfg.run_dir / "redis-cluster" / str(port)


def _info(port: int) -> dict[str, str]:
    import redis

    try:
        raw = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1).execute_command("CLUSTER", "INFO")
    except Exception:
        return {}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _answers(port: int) -> bool:
    """A Redis server answers PING on `port` (a cluster bus port does not)."""
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1).ping())
    except redis.AuthenticationError:
        return True  # a Redis that wants a password is still a Redis
    except Exception:
        return False


def cluster_ok(port: int) -> bool:
    """The node on `port` answers and belongs to a cluster that serves every slot."""
    info = _info(port)
    return info.get("cluster_state") == "ok" and info.get("cluster_slots_assigned") == "16384"


def cluster_up(cfg: ServiceConfig, first_port: int = CLUSTER_PORT, masters: int = MASTERS) -> str:
    """Start the masters that are not running, form the cluster if needed, apply the ACL users on each."""
    ports = list(range(first_port, first_port + masters))
    binary = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if not binary or not cli:
        raise ServiceError("redis-server and redis-cli are needed. Debian/Ubuntu: sudo apt-get install -y redis-server")
    started = []
    for port in ports:
        if port_open(port):
            if not _answers(port):
                raise ServiceError(f"port {port} is taken by something that is not a Redis node (another cluster's "
                                   f"bus port is its port + 10000); choose other cluster ports")
            continue
        if port_open(port + 10_000):
            raise ServiceError(f"port {port + 10_000}, the cluster bus port of node {port}, is taken (another "
                               f"cluster's node or bus); choose other cluster ports")
        folder = node_dir(cfg, port)
        folder.mkdir(parents=True, exist_ok=True)
        log = cfg.logs_dir / f"redis-cluster-{port}.log"
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
               "--dir", str(folder.resolve()), "--daemonize", "no", "--protected-mode", "yes"]
        _spawn(cmd, log, folder / "redis.pid")
        started.append(port)
    for port in ports:
        _wait_for(lambda p=port: port_open(p), 20, f"Redis cluster node {port}", cfg.logs_dir / f"redis-cluster-{port}.log")
    if not cluster_ok(first_port):
        if any(_info(p).get("cluster_known_nodes", "1") != "1" for p in ports):
            raise ServiceError(f"Redis nodes on ports {ports} hold a different or broken cluster; stop them "
                               f"(velocity services down --redis-cluster) and remove {cfg.run_dir / 'redis-cluster'}")
        res = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                              "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {(res.stdout + res.stderr).strip()[-500:]}")
        _wait_for(lambda: all(cluster_ok(p) for p in ports), 30, "Redis Cluster (every slot served)")
    users_file = cluster_users(cfg, ports)
    what = f"started {len(started)}" if started else "already running"
    return (f"Redis Cluster of {masters} masters on 127.0.0.1:{ports[0]}-{ports[-1]} ({what}, no persistence); "
            f"ACL users on every master, passwords in {users_file}; set VELOCITY_REDIS_CLUSTER=true "
            f"VELOCITY_REDIS_PORT={ports[0]}")


def cluster_users(cfg: ServiceConfig, ports: list[int], prefix: str = "vel:") -> Path:
    """The ACL users of the single-node Redis (same passwords file), applied on each master."""
    import redis

    from stores.redis_acl import apply_users, users

    path = cfg.redis_dir / "users.env"
    known = {}
    if path.is_file():
        known = dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)
    accounts = users(known.get("READER_PASSWORD"), known.get("WRITER_PASSWORD"))
    for port in ports:
        apply_users(redis.Redis(port=port, socket_timeout=2), accounts, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(f"READER_PASSWORD={accounts[0].password}\nWRITER_PASSWORD={accounts[1].password}\n")
    return path


def cluster_down(cfg: ServiceConfig, first_port: int = CLUSTER_PORT, masters: int = MASTERS) -> list[str]:
    """Stop the masters this tool started (their pid files), nothing else."""
    return [_stop(node_dir(cfg, p) / "redis.pid", f"Redis cluster node {p}", 10)
            for p in range(first_port, first_port + masters)]


def started_cluster_ports(cfg: ServiceConfig) -> list[int]:
    """Ports of cluster nodes this tool started in the run directory (their pid files), whatever the first port."""
    root = cfg.run_dir / "redis-cluster"
    return sorted(int(d.name) for d in root.glob("*") if d.name.isdigit() and (d / "redis.pid").exists())


def cluster_status(cfg: ServiceConfig, first_port: int = CLUSTER_PORT, masters: int = MASTERS) -> list:
    """One `ServiceStatus` per master: running means it answers and the cluster serves every slot."""
    from services.manager import ServiceStatus

    return [ServiceStatus(f"redis-cluster-{p}", f"127.0.0.1:{p}", cluster_ok(p), _read_pid(node_dir(cfg, p) / "redis.pid"),
                          cfg.logs_dir / f"redis-cluster-{p}.log") for p in range(first_port, first_port + masters)]
