"""Quick moves of VMs that are not running, between two in-process hosts (no QEMU needed).

Both hosts use the real host and migration layers on temporary directories and one shared
folder; the destination agent is called in-process instead of over HTTPS. Running VMs (save and
restore with real guests) are covered by tests/integration/test_quick_migration.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmferry.errors import HostError, NotFoundError, RefusedError, UnreachableError
from vmferry.host.owner import read_owner
from vmferry.host.settings import HostSettings, SwitchSpec
from vmferry.host.spec import NicCreate, VMCreate
from vmferry.host.vms import Runtime, VMManager
from vmferry.migration.engine import Moves
from vmferry.migration.incoming import IncomingMoves
from vmferry.migration.model import CheckResult, Destination, Job, MoveOptions, MoveRequest
from vmferry.migration.quick import QuickMoves, QuickRequest
from vmferry.migration.slots import Slots

NO_IMAGE = (Path("/nonexistent"), Path("/nonexistent"))


class LocalPeer:
    """The destination's QuickMoves called directly; ``lose_answer`` drops receive's reply."""

    def __init__(self, dest: QuickMoves, fail_receive: bool = False, lose_answer: bool = False):
        self.dest = dest
        self.fail_receive = fail_receive
        self.lose_answer = lose_answer

    async def quick_checks(self, req: QuickRequest) -> list[CheckResult]:
        return await asyncio.to_thread(self.dest.checks, req)

    async def quick_receive(self, req: QuickRequest) -> dict[str, Any]:
        if self.fail_receive:
            raise HostError("destination QEMU failed to start")
        result = await self.dest.receive(req, "https://h2.example:7443")
        if self.lose_answer:
            raise UnreachableError("destination agent h2 did not answer: read timeout")
        return result

    async def vm(self, name: str) -> dict[str, Any] | None:
        try:
            return self.dest.vms.info(name).model_dump(mode="json")
        except NotFoundError:
            return None

    async def close(self) -> None:
        return None


def _side(tmp_path: Path, name: str, shared: Path, switches: dict[str, SwitchSpec]) -> QuickMoves:
    local = tmp_path / name / "storage"
    local.mkdir(parents=True)
    settings = HostSettings(name=name, accelerator="tcg", storage_roots=[str(local), str(shared)],
                            switches=switches)  # fmt: skip
    state = tmp_path / name / "state"
    vms = VMManager(state, lambda: settings, image=lambda: NO_IMAGE)
    slots = Slots(lambda: 2)
    moves = Moves(vms, lambda: settings, slots, state, lambda d: None)  # type: ignore[arg-type,return-value]
    return QuickMoves(moves, IncomingMoves(vms, lambda: settings, slots), lambda d: None)  # type: ignore[arg-type,return-value]


Pair = tuple[QuickMoves, QuickMoves, Path]


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    shared = tmp_path / "shared"
    shared.mkdir()
    ext = {"external": SwitchSpec(bridge="br-x")}  # names only: no bridge is created
    return _side(tmp_path, "h1", shared, ext), _side(tmp_path, "h2", shared, ext), shared


def _create(q: QuickMoves, shared: Path, name: str = "vm1", nic: str = "external") -> None:
    req = VMCreate(name=name, memory_mib=64, nics=[NicCreate(switch=nic)],
                   storage_dir=str(shared / name))  # fmt: skip
    asyncio.run(q.vms.create(req))


def _move(src: QuickMoves, peer: LocalPeer, name: str = "vm1") -> Job:
    async def go() -> Job:
        src._peers = lambda d: peer
        req = MoveRequest(destination=Destination(name="h2", url="https://h2.example:7443"),
                          options=MoveOptions(quick=True))  # fmt: skip
        job = await src.submit(name, req)
        task = src.moves._tasks[job.id]
        await asyncio.wait_for(task, 30)
        return src.moves.get(job.id)

    return asyncio.run(go())


def _names(q: QuickMoves) -> list[str]:
    return [v.name for v in q.vms.list()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_off_vm_changes_owner(pair: Pair) -> None:
    h1, h2, shared = pair
    _create(h1, shared)
    job = _move(h1, LocalPeer(h2))
    assert job.state.value == "completed", job.error
    assert job.kind == "quick" and job.downtime_ms is None and job.vm_state == "off"
    assert [p.phase.value for p in job.phases] == ["queued", "checks", "switchover", "resume",
                                                  "cleanup"]  # fmt: skip
    assert _names(h1) == [] and _names(h2) == ["vm1"]
    assert h2.vms.state("vm1").value == "off"
    rec = read_owner(shared / "vm1")
    assert rec is not None and rec.host == "h2" and rec.url == "https://h2.example:7443"
    # The job is in the live moves' store: listed and persisted like them.
    assert h1.moves.all()[0].id == job.id
    assert json.loads((h1.moves.dir / f"{job.id}.json").read_text())["kind"] == "quick"


def test_saved_vm_keeps_its_state_and_pause(pair: Pair) -> None:
    h1, h2, shared = pair
    _create(h1, shared)
    spec = h1.vms.spec("vm1")
    (shared / "vm1" / "saved.vmstate").write_bytes(b"memory")
    h1.vms._save_runtime(spec, Runtime(expected="saved", saved_paused=True))
    job = _move(h1, LocalPeer(h2))
    assert job.state.value == "completed", job.error
    assert h2.vms.state("vm1").value == "saved"
    assert (shared / "vm1" / "saved.vmstate").read_bytes() == b"memory"
    assert h2.vms._runtime(h2.vms.spec("vm1")).saved_paused is True


def test_destination_refusal_changes_nothing(pair: Pair, tmp_path: Path) -> None:
    h1, _, shared = pair
    h2 = _side(tmp_path, "h3", shared, {})  # no virtual switch "external"
    _create(h1, shared)
    before = _files(shared / "vm1")
    job = _move(h1, LocalPeer(h2))
    assert job.state.value == "failed" and job.error is not None
    assert job.error.phase.value == "checks"
    assert "no virtual switch named external" in job.error.message
    assert job.error.fix and "--switch-map" in job.error.fix
    assert _names(h1) == ["vm1"] and _names(h2) == []
    assert _files(shared / "vm1") == before


def test_failed_take_over_rolls_back_to_the_source(pair: Pair) -> None:
    h1, h2, shared = pair
    _create(h1, shared)
    job = _move(h1, LocalPeer(h2, fail_receive=True))
    assert job.state.value == "failed" and job.error is not None
    assert job.error.phase.value == "resume" and "failed to start" in job.error.message
    assert "rollback" in [p.phase.value for p in job.phases]
    assert _names(h1) == ["vm1"] and _names(h2) == []
    assert h1.vms.state("vm1").value == "off"
    rec = read_owner(shared / "vm1")
    assert rec is not None and rec.host == "h1" and not rec.released


def test_lost_answer_is_not_a_second_instance(pair: Pair) -> None:
    h1, h2, shared = pair
    _create(h1, shared)
    job = _move(h1, LocalPeer(h2, lose_answer=True))
    # h2 owns the VM: the source must not import it back; the move counts as done.
    assert job.state.value == "completed", job.error
    assert any("owns the VM" in e for e in job.escalations)
    assert _names(h1) == [] and _names(h2) == ["vm1"]


def test_refused_options_and_states(pair: Pair) -> None:
    h1, _, shared = pair
    _create(h1, shared)
    spec = h1.vms.spec("vm1")
    h1.vms._save_runtime(spec, Runtime(expected="crashed"))

    def submit(**opts: Any) -> Callable[[], Any]:
        req = MoveRequest(destination=Destination(name="h2", url="https://h2.example:7443"),
                          options=MoveOptions(quick=True, **opts))  # fmt: skip
        return lambda: asyncio.run(h1.submit("vm1", req))

    with pytest.raises(RefusedError) as ei:
        submit(storage_path="elsewhere")()
    assert ei.value.field == "storage_path"
    with pytest.raises(RefusedError) as ei:
        submit()()
    assert "crashed" in str(ei.value) and "ferry vm stop" in str(ei.value)
    assert h1.moves.all() == []
