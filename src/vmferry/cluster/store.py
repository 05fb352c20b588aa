"""The cluster's state in etcd: typed keys and the transactions that change them.

Layout (``<c>`` = cluster name, ``<n>`` = node name)::

    /vmferry/nodes/<n>                      the cluster <n> belongs to (a node is in at most one)
    /vmferry/clusters/<c>/info              ClusterInfo
    /vmferry/clusters/<c>/nodes/<n>         NodeRecord (membership; written by create/join)
    /vmferry/clusters/<c>/alive/<n>         AliveRecord, attached to <n>'s lease (gone = expired)
    /vmferry/clusters/<c>/leader            LeaderRecord, attached to the leader's lease
    /vmferry/clusters/<c>/volumes/<path>    VolumeRecord (path URL-quoted)
    /vmferry/clusters/<c>/vms/<vm>          ClusteredVM (the owner node of a clustered VM)
    /vmferry/clusters/<c>/fenced/<n>        FenceRecord (the last time <n> fenced itself)

Every change that touches more than one key is one transaction whose compares make it refuse
(and change nothing) when the state is not what the request assumed.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Literal
from urllib.parse import quote, unquote

from pydantic import BaseModel, Field

from vmferry.cluster.etcd import KV, Etcd, EtcdUnavailable, Txn, _b64, _kv, prefix_end
from vmferry.cluster.placement import Priority
from vmferry.errors import ConflictError, NotFoundError, RefusedError

ROOT = "/vmferry"
CLUSTER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: etcd refuses a transaction of more than 128 compares (--max-txn-ops).
MAX_HELD_CHECK = 120


class ClusterInfo(BaseModel):
    """The cluster itself."""

    name: str
    created_at: float
    created_by: str | None = None


class DrainRecord(BaseModel):
    """A drain of a node (``ferry cluster drain``) or a failback to it (``resume --failback``).

    The leader's controller works through it (cluster/planned.py); ``status`` is ``running``
    until every VM it covers has moved or failed, then ``done`` or ``failed``.
    """

    kind: Literal["drain", "failback"] = "drain"
    status: Literal["running", "done", "failed"] = "running"
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    by: str | None = None
    #: VMs the drain has started a move for (a new leader does not start them twice).
    attempted: list[str] = Field(default_factory=list)
    #: VM → the node it moved to (a failback moves these back).
    moved: dict[str, str] = Field(default_factory=dict)
    #: VM → why it could not move live (it keeps running where it was).
    failed: dict[str, str] = Field(default_factory=dict)
    #: For a failback: the VMs to bring back (the drain's ``moved``).
    bring_back: list[str] = Field(default_factory=list)


class NodeRecord(BaseModel):
    """A member node and the URL of its agent."""

    name: str
    url: str
    joined_at: float = Field(default_factory=time.time)
    #: Paused nodes (``ferry cluster drain``) receive no VMs: not by failover, not by a move.
    paused: bool = False
    drain: DrainRecord | None = None


class AliveRecord(BaseModel):
    """Written by a node's agent under its lease while it renews it."""

    node: str
    lease: int
    ttl_s: int
    since: float
    version: str | None = None


class LeaderRecord(BaseModel):
    """The elected leader (runs the controller)."""

    node: str
    lease: int
    since: float


class VolumeRecord(BaseModel):
    """A shared volume every node sees."""

    path: str
    added_at: float = Field(default_factory=time.time)
    checked: dict[str, str] = Field(default_factory=dict)


class ClusteredVM(BaseModel):
    """A VM the cluster keeps available; ``node`` owns (runs) it."""

    name: str
    node: str
    added_at: float = Field(default_factory=time.time)
    # -- clustered-VM properties (``ferry cluster vm add|set``; cluster/vms.py) --------------
    uuid: str | None = None
    #: The VM's folder on a shared volume (what failover imports on the new node).
    storage_dir: str | None = None
    memory_mib: int = 0
    priority: Priority = "medium"
    preferred: list[str] = Field(default_factory=list)
    possible: list[str] = Field(default_factory=list)
    anti_affinity: str | None = None
    #: Set when the controller gave the VM to ``node`` and has not yet seen it start there.
    restart_pending: bool = False
    #: A planned move (``ferry cluster move``, drain) to this node is in progress: until the
    #: owner records its outcome, both nodes may hold the VM, both fence it, and failover
    #: asks this node first (cluster/planned.py).
    moving_to: str | None = None
    move_job: str | None = None
    #: The admin stopped, shut down or saved the VM through ferry: failover gives it to a new
    #: node without starting it there. A start or restore through ferry clears it.
    keep_off: bool = False


def holds(vm: ClusteredVM, node: str) -> bool:
    """Whether ``node`` holds ``vm``: it owns it, or a planned move to it is in progress (what
    :meth:`ClusterStore.clustered_vms` selects for a node; the member applies it to changes)."""
    return node in (vm.node, vm.moving_to)


class FenceRecord(BaseModel):
    """What a node stopped when it could not renew its lease."""

    node: str
    at: float
    vms: list[str]
    reason: str


def check_cluster_name(name: str) -> str:
    """``name`` if it is a valid cluster name, else RefusedError."""
    if not CLUSTER_RE.match(name):
        raise RefusedError(
            f"cluster name {name!r} is not valid",
            field="name",
            fix="use 1-32 of a-z 0-9 - (starting with a letter or digit)",
        )
    return name


def check_node_name(name: str, field: str = "nodes") -> str:
    """``name`` if it is a valid node (host) name, else RefusedError."""
    if not NODE_RE.match(name):
        raise RefusedError(
            f"node name {name!r} is not valid",
            field=field,
            fix="use the host's name: 1-63 of A-Z a-z 0-9 _ . -",
        )
    return name


def check_volume_path(path: str) -> str:
    """The normalised absolute path of a shared volume, else RefusedError."""
    if not path or not os.path.isabs(path) or "\x00" in path:
        raise RefusedError(
            f"shared volume path {path!r} must be absolute", field="path", fix="e.g. /mnt/shared"
        )
    return os.path.normpath(path)


class Keys:
    """Key names of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.prefix = f"{ROOT}/clusters/{cluster}/"
        self.info = self.prefix + "info"
        self.leader = self.prefix + "leader"

    @staticmethod
    def membership(node: str) -> str:
        """The node → cluster index key."""
        return f"{ROOT}/nodes/{node}"

    def node(self, n: str) -> str:
        return f"{self.prefix}nodes/{n}"

    def alive(self, n: str) -> str:
        return f"{self.prefix}alive/{n}"

    def volume(self, path: str) -> str:
        return f"{self.prefix}volumes/{quote(path, safe='')}"

    def vm(self, name: str) -> str:
        return f"{self.prefix}vms/{name}"

    def fenced(self, n: str) -> str:
        return f"{self.prefix}fenced/{n}"


class ClusterState(BaseModel):
    """One consistent read of everything under a cluster's prefix."""

    info: ClusterInfo
    revision: int
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)
    alive: dict[str, AliveRecord] = Field(default_factory=dict)
    leader: LeaderRecord | None = None
    volumes: dict[str, VolumeRecord] = Field(default_factory=dict)
    vms: dict[str, ClusteredVM] = Field(default_factory=dict)
    fenced: dict[str, FenceRecord] = Field(default_factory=dict)


class ClusterStore:
    """Typed access to the cluster keys in etcd (blocking; see :class:`Etcd`)."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    # -- reads ------------------------------------------------------------------------------
    def cluster_of(self, node: str) -> str | None:
        """The cluster ``node`` belongs to, or None."""
        kv = self.etcd.get(Keys.membership(node))
        return kv.value.decode() if kv else None

    def load(self, cluster: str) -> ClusterState:
        """Everything about ``cluster`` in one read (NotFoundError if it does not exist)."""
        keys = Keys(check_cluster_name(cluster))
        data = self.etcd._post(
            "/kv/range",
            {"key": _b64(keys.prefix), "range_end": _b64(keys.prefix[:-1] + "0")},
        )  # '/' + 1 == '0': every key under the prefix
        revision = int(data.get("header", {}).get("revision", 0))
        kvs = [_kv(i) for i in data.get("kvs") or []]
        return _state(keys, kvs, revision)

    def leader_check(self, cluster: str, since_revision: int) -> tuple[set[str], bool]:
        """The nodes whose lease is alive, and whether any node record (a pause, drain,
        failback, join or leave) was written after store revision ``since_revision``: one
        transaction of two keys-only reads, cheap enough for the leader to ask every 0.2 s."""
        keys = Keys(check_cluster_name(cluster))
        alive, nodes = keys.alive(""), keys.node("")
        txn = Txn()
        txn.success.append({"request_range": {
            "key": _b64(alive), "range_end": _b64(prefix_end(alive)), "keys_only": True,
        }})  # fmt: skip
        txn.success.append({"request_range": {
            "key": _b64(nodes), "range_end": _b64(prefix_end(nodes)), "keys_only": True,
            "min_mod_revision": str(since_revision + 1),
        }})  # fmt: skip
        res = self.etcd._post("/kv/txn", txn.body())
        out = [(r.get("response_range") or {}).get("kvs") or [] for r in res.get("responses") or []]
        if len(out) != 2:
            raise EtcdUnavailable(f"etcd answered a two-range transaction with {len(out)}")
        return {_kv(i).key[len(alive) :] for i in out[0]}, bool(out[1])

    def exists(self, cluster: str) -> bool:
        """True when the cluster exists."""
        return self.etcd.get(Keys(check_cluster_name(cluster)).info) is not None

    # -- lifecycle --------------------------------------------------------------------------
    def create(
        self, cluster: str, nodes: list[NodeRecord], created_by: str | None = None
    ) -> ClusterState:
        """Create ``cluster`` with ``nodes``; refused if it exists or a node is in a cluster."""
        keys = Keys(check_cluster_name(cluster))
        if not nodes:
            raise RefusedError(
                "a cluster needs at least one node", field="nodes", fix="--nodes h1,h2"
            )
        names = [check_node_name(n.name) for n in nodes]
        if len(set(names)) != len(names):
            raise RefusedError("a node is named twice", field="nodes", fix="name each node once")
        info = ClusterInfo(name=cluster, created_at=time.time(), created_by=created_by)
        txn = Txn().absent(keys.info)
        for n in names:
            txn.absent(Keys.membership(n))
        txn.success.append(Txn.put(keys.info, info.model_dump_json()))
        for rec in nodes:
            txn.success.append(Txn.put(keys.node(rec.name), rec.model_dump_json()))
            txn.success.append(Txn.put(Keys.membership(rec.name), cluster))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            if self.exists(cluster):
                raise ConflictError(
                    f"cluster {cluster!r} already exists",
                    field="name",
                    fix=f"pick another name, or see it with: ferry cluster status {cluster}",
                )
            self._refuse_members(names)
            raise ConflictError(f"cluster {cluster!r} changed meanwhile; try again")
        return self.load(cluster)

    def _refuse_members(self, names: list[str]) -> None:
        for n in names:
            other = self.cluster_of(n)
            if other is not None:
                raise ConflictError(
                    f"node {n!r} is already in cluster {other!r}",
                    field="nodes",
                    fix=f"ferry --host {n} cluster leave (or leave it out)",
                )

    def join(self, cluster: str, node: NodeRecord) -> ClusterState:
        """Add ``node`` to an existing cluster."""
        keys = Keys(check_cluster_name(cluster))
        check_node_name(node.name, "node")
        txn = Txn().present(keys.info).absent(Keys.membership(node.name))
        txn.success += [
            Txn.put(keys.node(node.name), node.model_dump_json()),
            Txn.put(Keys.membership(node.name), cluster),
        ]
        ok, _ = self.etcd.txn(txn)
        if not ok:
            self._require(cluster)
            other = self.cluster_of(node.name)
            if other == cluster:
                raise ConflictError(f"node {node.name!r} is already in cluster {cluster!r}")
            self._refuse_members([node.name])
            raise ConflictError(f"cluster {cluster!r} changed meanwhile; try again")
        return self.load(cluster)

    def leave(self, cluster: str, node: str) -> ClusterState:
        """Remove ``node`` from the cluster (refused while it owns clustered VMs)."""
        keys = Keys(check_cluster_name(cluster))
        state = self.load(cluster)
        if node not in state.nodes:
            raise NotFoundError(
                f"node {node!r} is not in cluster {cluster!r}",
                field="node",
                fix="members: " + ", ".join(sorted(state.nodes)),
            )
        owned = sorted(v.name for v in state.vms.values() if v.node == node)
        if owned:
            raise ConflictError(
                f"node {node!r} owns clustered VMs: {', '.join(owned)}",
                field="node",
                fix="move them to another node or remove them from the cluster first",
            )
        if len(state.nodes) == 1:
            raise ConflictError(
                f"{node!r} is the last node of cluster {cluster!r}",
                field="node",
                fix=f"ferry cluster destroy {cluster}",
            )
        txn = Txn().value_is(Keys.membership(node), cluster)
        txn.success += [
            Txn.delete(keys.node(node)),
            Txn.delete(keys.alive(node)),
            Txn.delete(Keys.membership(node)),
        ]
        kv = self.etcd.get(keys.leader)
        if kv is not None and LeaderRecord.model_validate_json(kv.value).node == node:
            txn.mod_is(keys.leader, kv.mod_revision)
            txn.success.append(Txn.delete(keys.leader))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            raise ConflictError(f"cluster {cluster!r} changed meanwhile; try again")
        return self.load(cluster)

    def destroy(self, cluster: str) -> list[str]:
        """Delete the cluster (refused while it has clustered VMs); the nodes it had."""
        keys = Keys(check_cluster_name(cluster))
        state = self.load(cluster)
        if state.vms:
            raise ConflictError(
                f"cluster {cluster!r} still has clustered VMs: {', '.join(sorted(state.vms))}",
                field="name",
                fix="remove them from the cluster first",
            )
        txn = Txn().present(keys.info)
        for n in state.nodes:
            txn.value_is(Keys.membership(n), cluster)
            txn.success.append(Txn.delete(Keys.membership(n)))
        txn.success.append(Txn.delete_prefix(keys.prefix))
        txn.unchanged_since(keys.prefix, state.revision)  # no VM was clustered meanwhile
        ok, _ = self.etcd.txn(txn)
        if not ok:
            raise ConflictError(f"cluster {cluster!r} changed meanwhile; try again")
        return sorted(state.nodes)

    def _require(self, cluster: str) -> None:
        if not self.exists(cluster):
            raise NotFoundError(
                f"no cluster {cluster!r}", field="name", fix="ferry cluster create NAME --nodes …"
            )

    # -- shared volumes ---------------------------------------------------------------------
    def add_volume(self, cluster: str, volume: VolumeRecord) -> ClusterState:
        """Record a (checked) shared volume."""
        keys = Keys(check_cluster_name(cluster))
        path = check_volume_path(volume.path)
        txn = Txn().present(keys.info).absent(keys.volume(path))
        txn.success.append(Txn.put(keys.volume(path), volume.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            self._require(cluster)
            raise ConflictError(f"{path} is already a shared volume of {cluster!r}", field="path")
        return self.load(cluster)

    def remove_volume(self, cluster: str, path: str) -> ClusterState:
        """Forget a shared volume (refused while a clustered VM's folder is on it)."""
        keys = Keys(check_cluster_name(cluster))
        path = check_volume_path(path)
        txn = Txn().present(keys.volume(path))
        txn.success.append(Txn.delete(keys.volume(path)))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            self._require(cluster)
            raise NotFoundError(
                f"{path} is not a shared volume of {cluster!r}",
                field="path",
                fix=f"see them with: ferry cluster volume list --cluster {cluster}",
            )
        return self.load(cluster)

    # -- clustered VMs (the records; `cluster vm add` comes later) ---------------------------
    def set_clustered_vm(self, cluster: str, vm: ClusteredVM) -> None:
        """Record ``vm`` as clustered and owned by ``vm.node`` (a member)."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().present(keys.info).value_is(Keys.membership(vm.node), cluster)
        txn.success.append(Txn.put(keys.vm(vm.name), vm.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            self._require(cluster)
            raise RefusedError(f"node {vm.node!r} is not in cluster {cluster!r}", field="node")

    def remove_clustered_vm(self, cluster: str, name: str) -> bool:
        """Forget a clustered VM; False if it was not clustered."""
        return self.etcd.delete(Keys(check_cluster_name(cluster)).vm(name)) > 0

    def clustered_vms(self, cluster: str, node: str | None = None) -> list[ClusteredVM]:
        """Clustered VMs, optionally only those ``node`` holds: it owns them, or a planned
        move to it is in progress (it fences those too)."""
        keys = Keys(check_cluster_name(cluster))
        vms = [
            ClusteredVM.model_validate_json(kv.value) for kv in self.etcd.get_prefix(keys.vm(""))
        ]
        return [v for v in vms if node is None or holds(v, node)]

    # -- membership (the node agents; cluster/member.py) -------------------------------------
    def announce(self, cluster: str, rec: AliveRecord) -> bool:
        """Put the node's alive key under its lease; False if it is no longer a member."""
        keys = Keys(cluster)
        txn = Txn().value_is(Keys.membership(rec.node), cluster)
        txn.success.append(Txn.put(keys.alive(rec.node), rec.model_dump_json(), rec.lease))
        ok, _ = self.etcd.txn(txn)
        return ok

    def campaign(self, cluster: str, node: str, lease: int) -> tuple[LeaderRecord | None, bool]:
        """Become leader if there is none (one txn).

        Returns the leader after it (None if none) and whether the node's alive key exists.
        """
        keys = Keys(cluster)
        me = LeaderRecord(node=node, lease=lease, since=time.time())
        alive = {"request_range": {"key": _b64(keys.alive(node))}}
        txn = Txn().absent(keys.leader).value_is(Keys.membership(node), cluster)
        txn.success += [Txn.put(keys.leader, me.model_dump_json(), lease), alive]
        txn.failure += [{"request_range": {"key": _b64(keys.leader)}}, alive]
        ok, responses = self.etcd.txn(txn)

        def kvs(i: int) -> list[dict[str, Any]]:
            if len(responses) <= i:
                return []
            return list((responses[i].get("response_range") or {}).get("kvs") or [])

        has_alive = bool(kvs(1))
        if ok:
            return me, has_alive
        found = kvs(0)
        leader = LeaderRecord.model_validate_json(_kv(found[0]).value) if found else None
        return leader, has_alive

    def record_fence(self, cluster: str, rec: FenceRecord) -> None:
        """Keep the node's last self-fencing for ``cluster status``."""
        self.etcd.put(Keys(cluster).fenced(rec.node), rec.model_dump_json())

    def vm_records_since(
        self, cluster: str, revision: int, held: list[str]
    ) -> tuple[list[KV] | None, int]:
        """The clustered-VM records written since a read made at store ``revision`` that found
        the VMs ``held`` (by name), and the store revision they are current at (to pass next
        time). ``[]`` when none was; None when this cannot tell cheaply (never read:
        ``revision`` 0; a VM of ``held`` was deleted; too many held to check in one
        transaction): then read them all.

        Cheap for etcd, so a node can ask every tick instead of reading every record: a
        count-only range (etcd's key index, no values, no transfer) shows whether the store
        revision moved at all; only then one transaction checks that every held VM's record
        still exists and returns the records with a newer mod revision (etcd filters them).
        """
        prefix = Keys(check_cluster_name(cluster)).vm("")
        end = _b64(prefix_end(prefix))
        data = self.etcd._post("/kv/range", {"key": _b64(prefix), "range_end": end,
                                             "count_only": True})  # fmt: skip
        now = int(data.get("header", {}).get("revision", 0))
        if revision <= 0 or len(held) > MAX_HELD_CHECK:
            return None, now  # a read made after this request is current at ``now`` at least
        if now == revision:  # nothing at all was written to etcd since
            return [], now
        txn = Txn()
        for name in held:
            txn.present(prefix + name)
        txn.success.append({"request_range": {
            "key": _b64(prefix), "range_end": end, "min_mod_revision": str(revision + 1),
        }})  # fmt: skip
        res = self.etcd._post("/kv/txn", txn.body())
        if not res.get("succeeded"):
            return None, now
        at = int(res.get("header", {}).get("revision", 0))
        rng = (res.get("responses") or [{}])[0].get("response_range") or {}
        return [_kv(i) for i in rng.get("kvs") or []], at


# -- clustered VMs, failover events, controller report (cluster/vms.py, cluster/controller.py) --
class ClusterEvent(BaseModel):
    """One thing the cluster did (or could not do) to a clustered VM: ``cluster status`` shows them.

    ``kind``: added | removed | changed | failover | restarted | rehomed (kept off) |
    restart-failed | unplaced | skipped. ``timings`` holds the failover's measured times in
    seconds (detection window, decision, restart).
    """

    at: float = Field(default_factory=time.time)
    kind: str
    vm: str | None = None
    node: str | None = None
    from_node: str | None = None
    reason: str = ""
    by: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class ControllerReport(BaseModel):
    """The leader's controller: its last pass, what it waits for, what it cannot place."""

    leader: str
    at: float
    dead_nodes: list[str] = Field(default_factory=list)
    unplaced: dict[str, str] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    in_flight: list[str] = Field(default_factory=list)


MAX_EVENTS = 500


def _event_key(keys: Keys, ev: ClusterEvent) -> str:
    return f"{keys.prefix}events/{int(ev.at * 1000):015d}-{os.urandom(3).hex()}"


class ClusterVMStore(ClusterStore):
    """The clustered-VM records with their revisions, events and the controller report."""

    def vm_record(self, cluster: str, name: str) -> tuple[ClusteredVM, int] | None:
        """A clustered VM and its mod revision, or None."""
        kv = self.etcd.get(Keys(check_cluster_name(cluster)).vm(name))
        return (ClusteredVM.model_validate_json(kv.value), kv.mod_revision) if kv else None

    def load_full(self, cluster: str) -> tuple[ClusterState, dict[str, int], int | None]:
        """One read of the cluster: the state, each VM's mod revision, the leader key's."""
        keys = Keys(check_cluster_name(cluster))
        data = self.etcd._post(
            "/kv/range", {"key": _b64(keys.prefix), "range_end": _b64(keys.prefix[:-1] + "0")}
        )
        revision = int(data.get("header", {}).get("revision", 0))
        kvs = [_kv(i) for i in data.get("kvs") or []]
        vm_prefix = keys.vm("")
        revs = {kv.key[len(vm_prefix) :]: kv.mod_revision for kv in kvs
                if kv.key.startswith(vm_prefix)}  # fmt: skip
        leader_rev = next((kv.mod_revision for kv in kvs if kv.key == keys.leader), None)
        rest = [kv for kv in kvs if not kv.key.startswith(keys.prefix + "events/")]
        return _state(keys, rest, revision), revs, leader_rev

    def add_vm(self, cluster: str, vm: ClusteredVM) -> None:
        """Make ``vm`` clustered (refused if it already is, or its node is not a member)."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().present(keys.info).value_is(Keys.membership(vm.node), cluster)
        txn.absent(keys.vm(vm.name))
        txn.success.append(Txn.put(keys.vm(vm.name), vm.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            self._require(cluster)
            if self.vm_record(cluster, vm.name) is not None:
                raise ConflictError(
                    f"VM {vm.name!r} is already clustered in {cluster!r}",
                    field="name", fix=f"change it with: ferry cluster vm set {vm.name} …",
                )  # fmt: skip
            raise RefusedError(
                f"node {vm.node!r} is not in cluster {cluster!r}", field="node",
                fix=f"ferry --host {vm.node} cluster join {cluster}",
            )  # fmt: skip

    def update_vm(self, cluster: str, vm: ClusteredVM, mod_revision: int) -> bool:
        """Write ``vm`` if its record is still at ``mod_revision``; False if it changed."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().mod_is(keys.vm(vm.name), mod_revision)
        txn.success.append(Txn.put(keys.vm(vm.name), vm.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        return ok

    def reassign(
        self, cluster: str, vm: ClusteredVM, mod_revision: int, dead: str, leader_rev: int
    ) -> bool:
        """Give ``vm`` (owned by ``dead``) to ``vm.node``, in one transaction that holds only
        while ``dead`` has no lease (its alive key is gone), the VM record is unchanged and the
        leader key is the one the caller holds. False when any of that no longer holds."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().mod_is(keys.vm(vm.name), mod_revision).absent(keys.alive(dead))
        txn.mod_is(keys.leader, leader_rev).value_is(Keys.membership(vm.node), cluster)
        txn.success.append(Txn.put(keys.vm(vm.name), vm.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        return ok

    # -- planned moves and drains (cluster/planned.py) -----------------------------------------
    def node_record(self, cluster: str, node: str) -> tuple[NodeRecord, int] | None:
        """A member's record and its mod revision, or None."""
        kv = self.etcd.get(Keys(check_cluster_name(cluster)).node(node))
        return (NodeRecord.model_validate_json(kv.value), kv.mod_revision) if kv else None

    def update_node(self, cluster: str, rec: NodeRecord, mod_revision: int) -> bool:
        """Write a member's record if it is still at ``mod_revision``; False if it changed."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().mod_is(keys.node(rec.name), mod_revision)
        txn.success.append(Txn.put(keys.node(rec.name), rec.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        return ok

    def begin_move(self, cluster: str, name: str, owner: str, to: str) -> ClusteredVM:
        """Mark the planned move of ``name`` from ``owner`` to ``to`` (one transaction that
        holds only while ``owner`` owns it, no other move is marked and ``to`` is an unpaused
        member); the marked record. Refused (nothing changed) otherwise."""
        keys = Keys(check_cluster_name(cluster))
        got = self.vm_record(cluster, name)
        if got is None:
            raise NotFoundError(f"VM {name!r} is not clustered in {cluster!r}", field="vm")
        vm, rev = got
        if vm.node != owner:
            raise ConflictError(f"VM {name!r} is owned by {vm.node}, not {owner}", field="vm",
                                fix=f"ask again: ferry cluster move {name} …")  # fmt: skip
        if vm.moving_to is not None:
            raise ConflictError(
                f"VM {name!r} is already moving to {vm.moving_to} (migration {vm.move_job})",
                field="vm", fix="wait for that move to end",
            )  # fmt: skip
        target = self.node_record(cluster, to)
        if target is None:
            raise NotFoundError(f"{to!r} is not a node of cluster {cluster!r}", field="to")
        if target[0].paused:
            raise ConflictError(f"node {to} is paused and takes no VMs", field="to",
                                fix=f"pick another node, or ferry cluster resume {to}")  # fmt: skip
        new = vm.model_copy(update={"moving_to": to, "move_job": None})
        txn = Txn().mod_is(keys.vm(name), rev).mod_is(keys.node(to), target[1])
        txn.success.append(Txn.put(keys.vm(name), new.model_dump_json()))
        ok, _ = self.etcd.txn(txn)
        if not ok:
            raise ConflictError(f"VM {name!r} or node {to} changed meanwhile; try again")
        return new

    def set_move_job(self, cluster: str, name: str, to: str, job: str) -> bool:
        """Record the migration job of the planned move to ``to`` (for status and a new leader)."""
        got = self.vm_record(cluster, name)
        if got is None or got[0].moving_to != to:
            return False
        return self.update_vm(cluster, got[0].model_copy(update={"move_job": job}), got[1])

    def end_move(self, cluster: str, name: str, owner: str, to: str, completed: bool) -> bool:
        """Record a planned move's outcome: ``to`` owns the VM (completed) or ``owner`` keeps
        it. Only while the record still shows that move; False when it does not."""
        got = self.vm_record(cluster, name)
        if got is None:
            return False
        vm, rev = got
        if vm.node != owner or vm.moving_to != to:
            return False
        upd: dict[str, Any] = {"moving_to": None, "move_job": None}
        if completed:
            upd |= {"node": to, "restart_pending": False}
        return self.update_vm(cluster, vm.model_copy(update=upd), rev)

    def reassign_many(
        self, cluster: str, moves: list[tuple[ClusteredVM, int, str, ClusterEvent]],
        leader_rev: int, chunk: int = 50,
    ) -> list[str]:  # fmt: skip
        """:meth:`reassign` for many VMs in few transactions (``chunk`` VMs each, with their
        events): each (new record, its mod revision, the dead owner, the event). A chunk whose
        transaction refuses is retried VM by VM, so one changed record holds back no other.
        Returns the names recorded."""
        keys = Keys(check_cluster_name(cluster))
        done: list[str] = []
        for i in range(0, len(moves), chunk):
            part = moves[i : i + chunk]
            txn = Txn().mod_is(keys.leader, leader_rev)
            for dead in sorted({d for _, _, d, _ in part}):
                txn.absent(keys.alive(dead))
            for node in sorted({vm.node for vm, _, _, _ in part}):
                txn.value_is(Keys.membership(node), cluster)
            for vm, rev, _, ev in part:
                txn.mod_is(keys.vm(vm.name), rev)
                txn.success.append(Txn.put(keys.vm(vm.name), vm.model_dump_json()))
                txn.success.append(Txn.put(_event_key(keys, ev), ev.model_dump_json()))
            ok, _ = self.etcd.txn(txn)
            if ok:
                done += [vm.name for vm, _, _, _ in part]
                continue
            for vm, rev, dead, ev in part:
                if self.reassign(cluster, vm, rev, dead, leader_rev):
                    self.add_event(cluster, ev)
                    done.append(vm.name)
        return done

    def add_event(self, cluster: str, ev: ClusterEvent) -> None:
        """Append an event."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().present(keys.info)  # never recreate keys of a destroyed cluster
        txn.success.append(Txn.put(_event_key(keys, ev), ev.model_dump_json()))
        self.etcd.txn(txn)

    def events(self, cluster: str, limit: int = 50) -> list[ClusterEvent]:
        """The last ``limit`` events, oldest first (etcd sends only those: keys sort by time)."""
        if limit <= 0:
            return []
        prefix = Keys(check_cluster_name(cluster)).prefix + "events/"
        data = self.etcd._post("/kv/range", {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "limit": str(limit),
            "sort_order": "DESCEND", "sort_target": "KEY",
        })  # fmt: skip
        kvs = [_kv(i) for i in data.get("kvs") or []]
        return [ClusterEvent.model_validate_json(kv.value) for kv in reversed(kvs)]

    def prune_events(self, cluster: str, keep: int = MAX_EVENTS) -> int:
        """Delete all but the newest ``keep`` events; how many were deleted."""
        keys = Keys(check_cluster_name(cluster))
        kvs = self.etcd.get_prefix(keys.prefix + "events/")
        old = kvs[: max(0, len(kvs) - keep)]
        for kv in old:
            self.etcd.delete(kv.key)
        return len(old)

    def put_report(self, cluster: str, rep: ControllerReport) -> None:
        """Publish the controller's last pass."""
        keys = Keys(check_cluster_name(cluster))
        txn = Txn().present(keys.info)
        txn.success.append(Txn.put(keys.prefix + "controller", rep.model_dump_json()))
        self.etcd.txn(txn)

    def report(self, cluster: str) -> ControllerReport | None:
        """The controller's last pass, if any."""
        kv = self.etcd.get(Keys(check_cluster_name(cluster)).prefix + "controller")
        return ControllerReport.model_validate_json(kv.value) if kv else None


def _state(keys: Keys, kvs: list[KV], revision: int) -> ClusterState:
    info: ClusterInfo | None = None
    parts: dict[str, Any] = {"nodes": {}, "alive": {}, "volumes": {}, "vms": {}, "fenced": {}}
    leader = None
    models: dict[str, type[BaseModel]] = {
        "nodes": NodeRecord,
        "alive": AliveRecord,
        "volumes": VolumeRecord,
        "vms": ClusteredVM,
        "fenced": FenceRecord,
    }
    for kv in kvs:
        rest = kv.key[len(keys.prefix) :]
        if rest == "info":
            info = ClusterInfo.model_validate_json(kv.value)
        elif rest == "leader":
            leader = LeaderRecord.model_validate_json(kv.value)
        else:
            kind, _, name = rest.partition("/")
            if kind in models and name:
                parts[kind][unquote(name)] = models[kind].model_validate_json(kv.value)
    if info is None:
        raise NotFoundError(
            f"no cluster {keys.cluster!r}", field="name", fix="ferry cluster create NAME --nodes …"
        )
    return ClusterState(info=info, revision=revision, leader=leader, **parts)
