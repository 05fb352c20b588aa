"""The "best possible node" for clustered VMs: a pure function, no I/O.

For each VM, highest priority first (then larger memory first, then name, so the result is
deterministic), the candidate nodes are the alive ones that are possible owners (all nodes when
the VM names none) and have the VM's memory free. Among them the best node is, in this order:

1. the fewest VMs of the VM's anti-affinity group already there (spread the group);
2. a preferred owner, earlier in the VM's preferred list first;
3. the most free memory left after the VM (headroom);
4. the node name (deterministic ties).

Each placement takes its memory and its group slot on the chosen node before the next VM is
placed. VMs with priority ``no-auto-start`` are never placed; VMs that fit nowhere are returned
with the reason, never dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Priority = Literal["high", "medium", "low", "no-auto-start"]
PRIORITIES: tuple[Priority, ...] = ("high", "medium", "low", "no-auto-start")
_RANK = {p: i for i, p in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class VMDemand:
    """A VM to place."""

    name: str
    memory_mib: int
    priority: Priority = "medium"
    preferred: tuple[str, ...] = ()
    possible: tuple[str, ...] = ()
    anti_affinity: str | None = None


@dataclass
class NodeRoom:
    """An alive node that may receive VMs: its free memory and the groups it already runs."""

    name: str
    free_mib: int
    groups: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Decision:
    """VM → node, and why that node."""

    vm: str
    node: str
    priority: Priority
    reason: str


@dataclass
class Placement:
    """The result: where each VM goes, which fit nowhere (with why), which were skipped."""

    decisions: list[Decision] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def assigned(self) -> dict[str, str]:
        """VM name → node."""
        return {d.vm: d.node for d in self.decisions}


def order(vms: Iterable[VMDemand]) -> list[VMDemand]:
    """The order VMs are placed (and restarted) in: priority, then larger first, then name."""
    return sorted(vms, key=lambda v: (_RANK[v.priority], -v.memory_mib, v.name))


def place(vms: Sequence[VMDemand], nodes: Sequence[NodeRoom]) -> Placement:
    """Place ``vms`` on ``nodes`` (which are copied, not changed)."""
    rooms = {n.name: NodeRoom(n.name, n.free_mib, Counter(n.groups)) for n in nodes}
    all_rooms = list(rooms.values())
    out = Placement()
    for vm in order(vms):
        if vm.priority == "no-auto-start":
            out.skipped[vm.name] = "priority no-auto-start: not restarted automatically"
            continue
        if vm.possible:
            cands = [rooms[n] for n in vm.possible if n in rooms]
            if not cands:
                out.unplaced[vm.name] = (
                    f"none of its possible owners ({', '.join(vm.possible)}) is alive"
                )
                continue
        else:
            cands = all_rooms
            if not cands:
                out.unplaced[vm.name] = "no node is alive"
                continue
        pref = {n: i for i, n in enumerate(vm.preferred)}
        npref = len(pref)
        group = vm.anti_affinity
        mem = vm.memory_mib
        best: NodeRoom | None = None
        best_key: tuple[int, int, int, str] | None = None
        for room in cands:
            if room.free_mib < mem:
                continue
            key = (
                room.groups[group] if group else 0,
                pref.get(room.name, npref),
                -(room.free_mib - mem),
                room.name,
            )
            if best_key is None or key < best_key:
                best, best_key = room, key
        if best is None or best_key is None:
            most = max(cands, key=lambda r: (r.free_mib, r.name))
            out.unplaced[vm.name] = (
                f"needs {mem} MiB; no possible owner has that free "
                f"(most: {most.free_mib} MiB on {most.name})"
            )
            continue
        best.free_mib -= mem
        if group:
            best.groups[group] += 1
        out.decisions.append(Decision(vm.name, best.name, vm.priority, _why(vm, best_key)))
    return out


def _why(vm: VMDemand, key: tuple[int, int, int, str]) -> str:
    same, pref_i, neg_room, _ = key
    parts = []
    if pref_i < len(vm.preferred):
        parts.append(f"preferred owner #{pref_i + 1}")
    if vm.anti_affinity:
        parts.append(
            f"anti-affinity {vm.anti_affinity}: {same} other member(s) there"
            if same
            else f"anti-affinity {vm.anti_affinity}: none there"
        )
    parts.append(f"{-neg_room} MiB free after it")
    if vm.possible:
        parts.append("a possible owner")
    return "; ".join(parts)
