"""The online store's apply and read on a Redis Cluster, for the sync and the asyncio store alike.

Each operation is planned once (which script runs on which master, with which arguments: `plan_apply`,
`plan_reads`), sent as one cluster pipeline (every master's calls together: one round trip per master involved),
and folded back into the single-node answer's shape (`finish_apply`, `finish_reads`). The design is in
`stores.redis_cluster_store`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import NoScriptError

from stores import redis_cluster_store as rc

#: A script call: (script name, routing key, ARGV).
Call = tuple[str, str, list]

SCRIPTS = ("apply_events.lua", "read_features.lua", "read_merchant.lua", "restore_events.lua")


class Scripts:
    """The store's scripts by name, with their SHA1s (loaded on every master on first use and after NOSCRIPT)."""

    def __init__(self) -> None:
        from stores.redis_online import _script

        self.text = {n: _script(n) for n in SCRIPTS}
        self.sha = {n: hashlib.sha1(t.encode()).hexdigest() for n, t in self.text.items()}


_SCRIPTS: Scripts | None = None


def scripts() -> Scripts:
    global _SCRIPTS
    if _SCRIPTS is None:
        _SCRIPTS = Scripts()
    return _SCRIPTS


def _queue(pipe, calls: Sequence[Call]) -> None:
    sha = scripts().sha
    for name, key, args in calls:
        pipe.execute_command("EVALSHA", sha[name], 1, key, *args)


def run_calls(client, calls: Sequence[Call]) -> list:
    """Script calls in one cluster pipeline; calls refused with NOSCRIPT (a restarted master) are loaded and
    sent once more (only those: the others have run)."""
    pipe = client.pipeline(transaction=False)
    _queue(pipe, calls)
    out = pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
    if missing:
        for name in {calls[i][0] for i in missing}:
            client.script_load(scripts().text[name])
        pipe = client.pipeline(transaction=False)
        _queue(pipe, [calls[i] for i in missing])
        for i, r in zip(missing, pipe.execute(raise_on_error=False), strict=True):
            out[i] = r
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out


async def run_calls_async(client, calls: Sequence[Call]) -> list:
    """`run_calls` on the asyncio cluster client."""
    pipe = client.pipeline()
    _queue(pipe, calls)
    out = await pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
    if missing:
        for name in {calls[i][0] for i in missing}:
            await client.script_load(scripts().text[name])
        pipe = client.pipeline()
        _queue(pipe, [calls[i] for i in missing])
        for i, r in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
            out[i] = r
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out


# ---------------------------------------------------------------- apply / restore


def plan_apply(store, nodes: rc.NodeMap, packed: list[str], chunk: int) -> tuple[list[Call], list[list[int]]]:
    """One apply call per master (per `chunk` events of it): the calls, and each call's event indices."""
    from stores.redis_online import apply_args

    calls, where = [], []
    for key, indices, sub in rc.split_packed(packed, nodes, store.keys.card):
        for i in range(0, len(indices), chunk):
            args = apply_args(store.keys.prefix, sub[4 * i:4 * (i + chunk)], store.lateness, store.retention,
                               store.ttl_s)
            calls.append(("apply_events.lua", key, args))
            where.append(indices[i:i + chunk])
    return calls, where


def plan_restore(store, nodes: rc.NodeMap, flat: list[str], cuts: dict[str, str]) -> list[Call]:
    """One restore call per master for archived events (6 strings each, stores/lua/restore_events.lua)."""
    import orjson

    calls = []
    for key, _, sub in rc.split_packed(flat, nodes, store.keys.card, width=6):
        mine = {c: cuts[c] for c in sub[0::6] if c in cuts}
        calls.append(("restore_events.lua", key, [store.keys.prefix, store.ttl_s, orjson.dumps(sub),
                                                  orjson.dumps(mine)]))
    return calls


def finish_apply(replies: list, where: list[list[int]], n: int) -> list:
    """Each call's per-event statuses put back in the input's order."""
    from stores.redis_online import applied_outcomes

    out: list = [None] * n
    for reply, indices in zip(replies, where, strict=True):
        for idx, applied in zip(indices, applied_outcomes(reply), strict=True):
            out[idx] = applied
    return out


# ---------------------------------------------------------------- reads


@dataclass
class ReadPlan:
    calls: list[Call]
    #: Per request: index of its card call, of its merchant call (None: none or same node), its ARGV.
    parts: list[tuple[int, int | None, list]]
    merchant_groups: frozenset[str]


def merchant_names(registry) -> str:
    return ",".join(g.name for g in registry.batch_groups if g.entity == "merchant")


def _merchant_call(prefix: str, nodes: rc.NodeMap, args: list, tag: str, groups: str, arrival: int) -> Call:
    node = nodes.node_of(tag)
    return ("read_merchant.lua", f"{prefix}:m:{tag}", [prefix, nodes.suffix(node), args[3], arrival, args[6], tag,
                                                       groups])


def plan_reads(store, nodes: rc.NodeMap, requests: Sequence, arrival_ms: int | None) -> ReadPlan:
    """Per (card, txn_id, ts[, merchant]) request: the card's call on its master (with the merchant when the
    merchant lives there too), else also a merchant call on the merchant's master."""
    from stores.redis_online import read_request_args

    prefix, registry = store.keys.prefix, store.registry
    groups = merchant_names(registry)
    calls: list[Call] = []
    parts = []
    for request in requests:
        args = read_request_args(prefix, request, arrival_ms, registry)
        card_key = store.keys.card(request[0])
        node = nodes.node_of(card_key)
        args[10] = nodes.suffix(node)
        m_index = None
        tag = args[8]
        if tag and nodes.node_of(tag) != node:
            args[8] = ""
            m_index = len(calls) + 1
            calls.append(("read_features.lua", card_key, args))
            calls.append(_merchant_call(prefix, nodes, args, tag, groups, args[5]))
            args = [*args[:8], tag, *args[9:]]  # keep the tag for a second merchant call
        else:
            calls.append(("read_features.lua", card_key, args))
        parts.append((len(calls) - 1 - (m_index is not None), m_index, args))
    return ReadPlan(calls, parts, frozenset(groups.split(",")) - {""})


def finish_reads(store, nodes: rc.NodeMap, plan: ReadPlan, replies: list) -> tuple[list, list[Call], list[int]]:
    """The card replies with the merchant's statistics merged in; the merchant calls still needed (a stored
    transaction whose own arrival chose another night) and the requests they belong to."""
    out, again, owners = [], [], []
    groups = ",".join(sorted(plan.merchant_groups))
    for i, (c_index, m_index, args) in enumerate(plan.parts):
        reply = replies[c_index]
        if m_index is not None and not rc.merge_merchant(reply, replies[m_index], plan.merchant_groups):
            arrival = rc.reply_arrival(reply, int(args[5]))
            again.append(_merchant_call(store.keys.prefix, nodes, args, args[8], groups, arrival))
            owners.append(i)
        out.append(reply)
    return out, again, owners


def settle(out: list, owners: list[int], replies: list, merchant_groups: frozenset[str]) -> list:
    """Merge the second merchant replies; a night still missing (a publication in progress) marks the read
    incomplete rather than mixing nights."""
    for i, reply in zip(owners, replies, strict=True):
        if not rc.merge_merchant(out[i], reply, merchant_groups):
            rc.mark_incomplete(out[i])
    return out
