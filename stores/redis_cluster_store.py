"""The online store on a Redis Cluster (`VELOCITY_REDIS_CLUSTER=true`): routing, index copies, read merging.

Design (the single-node path does none of this and is unchanged):

- A card's keys share a hash slot: `p:win:{<card>}`, `p:card:{<card>}`, and its nightly snapshot hashes
  `p:snap:<id>:card:{<card>}` (stores.online_snapshots `entity_tag`); a merchant's snapshot hashes share the
  merchant's slot. So a card's window state and its snapshot groups live on one node.
- Writes: a batch's events are grouped by the master that owns each card's slot, and each master gets one apply
  call (stores/lua/apply_events.lua, flag `allow-cross-slot-keys`: a script may touch keys of several slots as
  long as all live on the node that runs it; verified on Redis 7.0.15). The call declares one key (the first
  card's hash) so the client routes it; every node's call goes out in one cluster pipeline (one round trip per
  node, sent together). The rebuild's restore script is routed the same way.
- The snapshot index is global, so every master holds a copy (`p:w1:index:{<tag>}`, `p:w1:cutoffs:{<tag>}`),
  `<tag>` chosen so the copy lands on that master (`NodeMap`). A night is published on every copy (one MULTI/EXEC
  per copy) with `published_ms` set `PUBLISH_MARGIN_MS` after the first copy is written, and the writer waits until
  then before returning: a reader on any node sees the same visible nights at any arrival time, and a night is
  seen completely or not at all.
- Reads: the card's node runs the usual read script against its own index copy (windows, which night serves each
  group, the card's snapshot groups). If the merchant lives on the same node the same call reads it; otherwise
  stores/lua/read_merchant.lua runs on the merchant's node in the same pipeline and returns the merchant's
  statistics of the nights visible at the request's arrival. `merge_merchant` puts them into the card's reply,
  which then has the single-node reply's exact shape (so `fold_read` and the scorer are unchanged). The card's
  script decides which night serves each group (it knows a stored transaction's own arrival); when the merchant
  call resolved a different night (a stored transaction read after a newer night was published), one more call
  to the merchant's node with that arrival fills it in: exact, rarely needed.
- A rerun of a night already published (same cut-off, new snapshot id) replaces the copies one after the other:
  for those milliseconds a read may take the card's side from the new run and the merchant's from the old one
  (both that same night). A merchant night missing on its master (a backfill dated in the past, while its copies
  are written) marks the read incomplete rather than mixing nights.
- A slot moved by resharding: the next publication writes the copies for the new owners; until then reads of a
  moved card fail with a clear Redis error. Reshard, then rerun the night (`velocity batch`) or rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import redis.asyncio.cluster as aiocluster
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from featurestore.config import RedisSettings

#: How far ahead of the first index copy's write a cluster publication is dated (every copy is written by then).
PUBLISH_MARGIN_MS = 300


def _kwargs(settings: RedisSettings) -> dict:
    kwargs = settings.client_kwargs()
    for k in ("host", "port", "db"):
        kwargs.pop(k)
    return kwargs


def cluster_client(settings: RedisSettings) -> RedisCluster:
    """A synchronous cluster client seeded from the settings (any master is enough). It connects now; an
    unreachable cluster is a redis.ConnectionError (redis-py's own RedisClusterException is no RedisError)."""
    nodes = [ClusterNode(h, p) for h, p in settings.seeds()]
    try:
        return RedisCluster(startup_nodes=nodes, **_kwargs(settings))
    except RedisClusterException as exc:
        raise redis.ConnectionError(f"Redis Cluster at {settings.host}:{settings.port}: {exc}") from None


def async_cluster_client(settings: RedisSettings) -> aiocluster.RedisCluster:
    nodes = [aiocluster.ClusterNode(h, p) for h, p in settings.seeds()]
    return aiocluster.RedisCluster(startup_nodes=nodes, **_kwargs(settings))


def sync_client(settings: RedisSettings) -> redis.Redis | RedisCluster:
    """The client every synchronous component uses: a cluster client in cluster mode, else a plain one."""
    return cluster_client(settings) if settings.cluster else redis.Redis(**settings.client_kwargs())


class NodeMap:
    """Which master owns a key, and the hash tag of each master's index copy (from the client's slot table)."""

    def __init__(self, slots_cache: dict) -> None:
        self.source = slots_cache
        self.primary = [slots_cache[s][0].name for s in range(16384)]
        names = set(self.primary)
        self.tags: dict[str, str] = {}
        i = 0
        while len(self.tags) < len(names):
            self.tags.setdefault(self.primary[key_slot(str(i).encode())], str(i))
            i += 1

    def node_of(self, key: str) -> str:
        return self.primary[key_slot(key.encode())]

    def suffix(self, node: str) -> str:
        """The index-copy key suffix of a master (`p:w1:index` + suffix)."""
        return f":{{{self.tags[node]}}}"


_MAPS: dict[int, NodeMap] = {}


def node_map(client) -> NodeMap:
    """The NodeMap of a cluster client's current slot table (rebuilt when the client refreshes it)."""
    cache = client.nodes_manager.slots_cache
    got = _MAPS.get(id(client))
    if got is None or got.source is not cache:
        got = _MAPS[id(client)] = NodeMap(cache)
    return got


def split_packed(packed: list[str], nodes: NodeMap, card_key, width: int = 4) -> list[tuple[str, list[int],
                                                                                         list[str]]]:
    """Packed writes (`width` strings per event, the card first) grouped by the master owning each card:
    (routing key, event indices in the input, that master's packed writes), arrival order kept within each."""
    groups: dict[str, tuple[str, list[int], list[str]]] = {}
    seen: dict[str, str] = {}
    for i in range(len(packed) // width):
        card = packed[width * i]
        node = seen.get(card)
        if node is None:
            node = seen[card] = nodes.node_of(card_key(card))
        g = groups.get(node)
        if g is None:
            g = groups[node] = (card_key(card), [], [])
        g[1].append(i)
        g[2].extend(packed[width * i:width * i + width])
    return list(groups.values())


def reply_arrival(reply: Sequence, arrival_ms: int) -> int:
    """The arrival a read reply was judged at: a stored transaction's own (seq // 1000), else the request's."""
    stored = reply[0]
    if stored:
        text = stored.decode() if isinstance(stored, bytes) else stored
        return int(text.split("|", 1)[0]) // 1000
    return arrival_ms


def merge_merchant(reply: list, merchant_flat: Sequence | None, merchant_groups: frozenset[str]) -> bool:
    """Put the merchant node's statistics into the card node's reply, night by night (by cut-off).

    False when a night the card's script chose for a merchant group is not among them (ask again with the
    reply's own arrival); the reply is then left as it was."""
    by_cutoff = {}
    flat = merchant_flat or ()
    for i in range(0, len(flat), 2):
        c = flat[i]
        by_cutoff[c.decode() if isinstance(c, bytes) else str(c)] = flat[i + 1]
    fills = []
    for night in reply[3] or ():
        cutoff, held, cstats = night[0], night[1], night[2]
        if cstats is None:  # expired night: nothing to read for anyone
            continue
        names = (held.decode() if isinstance(held, bytes) else held).split(",")
        if not merchant_groups.intersection(names):
            continue
        key = cutoff.decode() if isinstance(cutoff, bytes) else str(cutoff)
        if key not in by_cutoff:
            return False
        fills.append((night, by_cutoff[key]))
    for night, stats in fills:
        night[3] = stats
    return True


def mark_incomplete(reply: list) -> None:
    """The merchant's statistics could not be read consistently (a publication in progress): say the read is
    incomplete rather than serve a mix."""
    reply[6] = 1
