"""Least-privilege Redis users: the scorer reads feature keys, the stream worker and the batch job write them.

Each component connects as its own user (`VELOCITY_REDIS_USERNAME` / `_PASSWORD` in its environment); none of
them can flush, reconfigure or script the server beyond the feature keys. `velocity services up` creates the
users on the local Redis (on every master of the local Redis Cluster with `--redis-cluster`); `velocity services
acl` prints the same commands for an external one (run them on every node of a cluster, replicas included). The
users may also read the cluster's slot table (CLUSTER SLOTS/SHARDS/NODES), which cluster clients need.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

#: Who reads: the HTTP scorer and `velocity features get`. Read commands on feature keys, the read script
#: (scripts run with the caller's permissions: a write inside one is refused), and connection housekeeping.
READER = "velocity-reader"
#: Who writes: the stream worker and the nightly batch job. Everything on feature keys except the dangerous
#: commands (FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG, SHUTDOWN, ...) and administration.
WRITER = "velocity-writer"

#: What a Redis Cluster client needs to learn the slot table (harmless on a single node: those commands then fail).
_CLUSTER_RULES = ("+cluster|slots", "+cluster|shards", "+cluster|nodes", "+cluster|info", "+cluster|myid",
                  "+readonly", "+readwrite")
_READER_RULES = ("-@all", "+@read", "+@connection", "-@dangerous", "+evalsha", "+eval", "+script|load",
                 "+script|exists", *_CLUSTER_RULES)
_WRITER_RULES = ("-@all", "+@read", "+@write", "+@keyspace", "+@sortedset", "+@hash", "+@string", "+@list",
                 "+@transaction", "+@scripting", "+@connection", "-@dangerous", "-@admin", "-script|flush",
                 "-script|kill", "-function", *_CLUSTER_RULES)


@dataclass(frozen=True)
class RedisUser:
    name: str
    password: str
    rules: tuple[str, ...]

    def setuser_args(self, key_pattern: str) -> list[str]:
        """`ACL SETUSER` arguments: reset first, so rerunning replaces (never widens) what the user may do."""
        return [self.name, "reset", "on", f">{self.password}", f"~{key_pattern}", "resetchannels", *self.rules]


def users(reader_password: str | None = None, writer_password: str | None = None) -> list[RedisUser]:
    """The two users, with the given passwords (new random ones where none is given)."""
    return [RedisUser(READER, reader_password or secrets.token_urlsafe(24), _READER_RULES),
            RedisUser(WRITER, writer_password or secrets.token_urlsafe(24), _WRITER_RULES)]


def key_pattern(prefix: str) -> str:
    """The keys a prefix owns (`vel:v1` -> `vel:v1*`); a wider prefix (`vel:`) covers every layout version."""
    return f"{prefix}*"


def apply_users(client: redis.Redis, accounts: list[RedisUser], prefix: str) -> None:
    """Create or reset the users on a Redis the client may administer (a cluster client sets them on every node:
    ACLs are per node in Redis Cluster)."""
    extra = {"target_nodes": RedisCluster.ALL_NODES} if isinstance(client, RedisCluster) else {}
    for user in accounts:
        client.execute_command("ACL", "SETUSER", *user.setuser_args(key_pattern(prefix)), **extra)


def commands_for(accounts: list[RedisUser], prefix: str) -> list[str]:
    """The `ACL SETUSER` lines an operator runs on an external Redis (redis-cli syntax)."""
    return [" ".join(["ACL SETUSER", *user.setuser_args(key_pattern(prefix))]) for user in accounts]
