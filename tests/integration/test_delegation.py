"""Move initiation modes against real agents in the lab (docs/security.md: who may start a move).

``delegated`` (the default): a remote client's move carries a ticket signed with the user's
key; the source and then the destination verify it, and the destination checks that the source's
certificate lists it as a delegation target. ``local``: only a client on the source host may
start a move. Every refusal leaves the VM running where it was.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import LabHandle, admin_ticket, needs_lab, post_incoming, vm_names, wait_job

from vmferry import __version__
from vmferry.client import FerryError
from vmferry.errors import ForbiddenError
from vmferry.host.spec import CONFIG_FILE
from vmferry.lab.procs import run_in_netns
from vmferry.security import CertificateAuthority, Role
from vmferry.security.tickets import SignedTicket

pytestmark = needs_lab


def _dest(lab: LabHandle, host: str) -> dict[str, str]:
    return {"name": host, "url": lab.lab.endpoint(host).url}


def _incoming_as(
    lab: LabHandle, cert: Path, key: Path, vm: str, ticket: SignedTicket, dry_run: bool
) -> httpx.Response:
    """POST an incoming move to h2 the way h1's agent would, with the given certificate."""
    with lab.client("h1") as c:
        info = c.vm(vm)
    spec = json.loads((Path(info["storage_dir"]) / CONFIG_FILE).read_text())
    body = {
        "job_id": "forged0001", "source": "h1", "source_version": __version__, "spec": spec,
        "options": {}, "transport": "tcp", "streams": 1, "postcopy": False,
        "cpu_vendor": "x", "cpu_flags": [], "dry_run": dry_run, "ticket": ticket.model_dump(),
    }  # fmt: skip
    return post_incoming(lab, cert, key, body)


def _refused(r: httpx.Response, text: str) -> None:
    assert r.status_code == 403, r.text
    assert text in r.json()["error"]["message"], r.json()


def test_delegated_tickets_are_verified_by_source_and_destination(
    lab: LabHandle, tmp_path: Path
) -> None:
    lab.make_vm("h1", "dl1", memory=128)
    h1_tls = lab.lab.host_dir("h1") / "tls"
    try:
        with lab.client("h1") as c:
            req = {"destination": _dest(lab, "h2"), "options": {}}
            # the source refuses a remote request without a ticket, or with a bad one
            with pytest.raises(ForbiddenError, match="needs a move ticket"):
                c.move("dl1", req, sign=False)
            for bad, why in (
                (admin_ticket(lab, "dl1", destination="h9"), "signed for destination"),
                (admin_ticket(lab, "other"), "signed for vm"),
                (admin_ticket(lab, "dl1", now=time.time() - 400), "expired"),
            ):
                with pytest.raises(ForbiddenError, match=why):
                    c.move("dl1", {**req, "ticket": bad.model_dump()})
            assert c.vm("dl1")["state"] == "running"
            assert not [j for j in c.migrations() if j["vm"] == "dl1"]

        # the destination verifies on its own: forged contents, a source not allowed to
        # delegate to it (a host certificate without h2 among its targets)
        good = admin_ticket(lab, "dl1")
        forged = good.model_copy(update={"payload": good.payload[:-4] + "AAAA"})
        _refused(
            _incoming_as(lab, h1_tls / "h1.crt", h1_tls / "h1.key", "dl1", forged, True),
            "tampered or forged",
        )
        ca = CertificateAuthority(lab.lab.dir / "pki")
        narrow = ca.issue(tmp_path / "narrow", "h1", role=Role.host, server_names=["h1"],
                          delegate=["h7:live"])  # fmt: skip
        _refused(
            _incoming_as(lab, narrow.cert, narrow.key, "dl1", good, True),
            "may not act for users towards h2",
        )

        # a valid ticket: the move runs; the same ticket is refused afterwards everywhere
        ticket = admin_ticket(lab, "dl1")
        with lab.client("h1") as c:
            job = c.move("dl1", {**req, "ticket": ticket.model_dump()})
        assert wait_job(lab, "h1", job["id"])["state"] == "completed"
        assert "dl1" in vm_names(lab, "h2") and "dl1" not in vm_names(lab, "h1")
        with lab.client("h1") as c, pytest.raises(ForbiddenError, match="replayed"):
            c.move("dl1", {**req, "ticket": ticket.model_dump()})
        # (h1 no longer has the VM: read its spec from h2 for the replay at the destination)
        with lab.client("h2") as c2:
            storage = Path(c2.vm("dl1")["storage_dir"])
        spec = json.loads((storage / CONFIG_FILE).read_text())
        body = {
            "job_id": "replay0001", "source": "h1", "source_version": __version__,
            "spec": spec, "options": {}, "transport": "tcp", "streams": 1, "postcopy": False,
            "cpu_vendor": "x", "cpu_flags": [], "dry_run": False, "ticket": ticket.model_dump(),
        }  # fmt: skip
        _refused(post_incoming(lab, h1_tls / "h1.crt", h1_tls / "h1.key", body), "replayed")
    finally:
        for host in ("h1", "h2"):
            if "dl1" in vm_names(lab, host):
                lab.remove_vm(host, "dl1")


_LOCAL_MOVE = """
import json, sys
from vmferry.client import FerryClient
from vmferry.client._config import HostEndpoint
ep = HostEndpoint.model_validate_json(sys.argv[1])
with FerryClient(ep) as c:
    print(json.dumps(c.move(sys.argv[2], json.loads(sys.argv[3]))))
"""


def test_local_mode_refuses_a_remote_start_and_accepts_one_on_the_host(lab: LabHandle) -> None:
    lab.make_vm("h1", "lo1", memory=128)
    with lab.client("h1") as c:
        mig = c.settings()["migration"]
        c.update_settings(migration={**mig, "authentication": "local"})
    try:
        req = {"destination": _dest(lab, "h2"), "options": {}}
        with lab.client("h1") as c:
            with pytest.raises(ForbiddenError, match="only on the host itself") as e:
                c.move("lo1", req)
            assert e.value.field == "migration.authentication"
            assert c.vm("lo1")["state"] == "running"
        # the same request from a client on h1 itself (in h1's namespace, to its own address)
        ep = lab.lab.endpoint("h1")
        netns = lab.topo.host("h1").netns
        argv = [sys.executable, "-c", _LOCAL_MOVE, ep.model_dump_json(), "lo1", json.dumps(req)]
        done = run_in_netns(netns, argv, 120)
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert wait_job(lab, "h1", job["id"])["state"] == "completed"
        assert "lo1" in vm_names(lab, "h2")
    finally:
        with lab.client("h1") as c:
            c.update_settings(migration={**mig, "authentication": "delegated"})
        for host in ("h1", "h2"):
            try:
                if "lo1" in vm_names(lab, host):
                    lab.remove_vm(host, "lo1")
            except FerryError:
                pass
