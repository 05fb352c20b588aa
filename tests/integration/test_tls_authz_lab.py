"""The destination QEMU admits only the source host's certificate (QEMU ``tls-authz``), in the lab.

A move is prepared and started on h2 directly through its API, as h1's agent would (h1's
certificate, a ticket the admin signed). While h2's QEMU waits for the stream, a client in h1's
network namespace connects to the migration port and to the NBD export with TLS: with the lab's
``operator`` certificate (same CA, not the source host) QEMU must drop the connection right
after the handshake; with h1's certificate the connection must stay open (so the check can
fail). Then the move is aborted and h2 must be clean.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import LabHandle, admin_ticket, needs_lab, post_incoming, vm_names, wait_for

from vmferry import __version__
from vmferry.host.host import cpu_info
from vmferry.host.spec import CONFIG_FILE
from vmferry.host.vms import vm_tag
from vmferry.lab.procs import run_in_netns
from vmferry.qemu.process import QemuProcess

pytestmark = needs_lab

#: Connects with TLS (after NBD's STARTTLS for "nbd") and reports what the server does next:
#: "open" (waits for the client: accepted), or "refused ..." (handshake failed or closed).
_TLS_CLIENT = r"""
import json, socket, ssl, sys
mode, host, port, cert, key, ca = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
ctx.load_cert_chain(cert, key)
raw = socket.create_connection((host, int(port)), timeout=10)
def out(result):
    print(json.dumps({"result": result}))
    sys.exit(0)
try:
    if mode == "nbd":
        hello = raw.recv(18, socket.MSG_WAITALL)
        assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
        raw.sendall((1).to_bytes(4, "big"))  # fixed newstyle
        raw.sendall(b"IHAVEOPT" + (5).to_bytes(4, "big") + (0).to_bytes(4, "big"))  # STARTTLS
        rep = raw.recv(20, socket.MSG_WAITALL)
        assert int.from_bytes(rep[12:16], "big") == 1, rep  # NBD_REP_ACK
    try:
        s = ctx.wrap_socket(raw, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        out(f"refused in the handshake: {exc}")
    s.settimeout(5)
    try:
        data = s.recv(1)
    except TimeoutError:
        out("open")
    except (ssl.SSLError, OSError) as exc:
        out(f"refused: closed after the handshake ({exc!r})")
    out("refused: closed after the handshake (EOF)" if not data else f"data {data!r}")
finally:
    raw.close()
"""


def _connect(lab: LabHandle, mode: str, address: str, port: int, cert: Path, key: Path) -> str:
    """Run :data:`_TLS_CLIENT` in h1's namespace; return its verdict."""
    ca = lab.lab.dir / "pki" / "ca.crt"
    argv = [sys.executable, "-c", _TLS_CLIENT, mode, address, str(port), str(cert), str(key)]
    done = run_in_netns(lab.topo.host("h1").netns, [*argv, str(ca)], 60)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["result"])


def _h2(lab: LabHandle, h1: Path, method: str, path: str, body: Any = None) -> httpx.Response:
    """Call h2's API with h1's host certificate (as h1's agent does)."""
    ep = lab.lab.endpoint("h2")
    ctx = ssl.create_default_context(cafile=ep.ca)
    ctx.load_cert_chain(str(h1 / "h1.crt"), str(h1 / "h1.key"))
    with httpx.Client(verify=ctx, timeout=60) as http:
        return http.request(method, f"{ep.url}{path}", json=body)


def test_destination_qemu_refuses_another_certificate(lab: LabHandle) -> None:
    lab.make_vm("h1", "az1", memory=128, disk_mib=16)
    h1 = lab.lab.host_dir("h1") / "tls"
    pki = lab.lab.dir / "pki"
    job = "authz0001"
    try:
        with lab.client("h1") as c:
            spec = json.loads((Path(c.vm("az1")["storage_dir"]) / CONFIG_FILE).read_text())
        cpu = cpu_info()
        body = {
            "job_id": job, "source": "h1", "source_version": __version__, "spec": spec,
            # a new folder on h2: shared-nothing, so h2 also exports the disk over NBD
            "options": {"storage_path": "az1-authz"}, "transport": "tcp", "streams": 1,
            "postcopy": False, "cpu_vendor": cpu["vendor"], "cpu_flags": cpu["flags"],
            "dry_run": False, "ticket": admin_ticket(lab, "az1").model_dump(),
        }  # fmt: skip
        r = post_incoming(lab, h1 / "h1.crt", h1 / "h1.key", body)
        assert r.status_code == 200, r.text
        plan = r.json()
        assert plan["encrypted"] and plan["mirrored"], plan
        address = plan["candidates"][0]
        r = _h2(lab, h1, "POST", f"/v1/migrations/incoming/{job}/start", {"address": address})
        assert r.status_code == 204, r.text
        run = lab.lab.host_dir("h2") / "state" / "run" / vm_tag(spec["uuid"])
        rt = json.loads((run / "runtime.json").read_text())
        qemu = QemuProcess(int(rt["pid"]), int(rt["start_time"]))

        # another certificate of the same CA: QEMU drops it on both ports
        op = (pki / "operator.crt", pki / "operator.key")
        mig = _connect(lab, "migration", address, plan["port"], *op)
        nbd = _connect(lab, "nbd", address, plan["nbd_port"], *op)
        assert mig.startswith("refused"), mig
        assert nbd.startswith("refused"), nbd
        # ... and keeps waiting for the real source
        st = _h2(lab, h1, "GET", f"/v1/migrations/incoming/{job}").json()
        assert st["alive"] and st["status"] == "inmigrate", st

        # the source host's own certificate is let in (the check can fail)
        src = (h1 / "h1.crt", h1 / "h1.key")
        assert _connect(lab, "nbd", address, plan["nbd_port"], *src) == "open"
        assert _connect(lab, "migration", address, plan["port"], *src) == "open"

        r = _h2(lab, h1, "POST", f"/v1/migrations/incoming/{job}/abort")
        assert r.status_code == 204, r.text
        assert _h2(lab, h1, "GET", f"/v1/migrations/incoming/{job}").status_code == 404
        wait_for(lambda: not qemu.alive(), 10, "the destination QEMU to end")
        assert "az1" not in vm_names(lab, "h2")
        assert not run.exists()
        assert not Path(plan["storage_dir"]).exists()
        with lab.client("h1") as c:
            assert c.vm("az1")["state"] == "running"
    finally:
        _h2(lab, h1, "POST", f"/v1/migrations/incoming/{job}/abort")
        time.sleep(0.2)
        if "az1" in vm_names(lab, "h1"):
            lab.remove_vm("h1", "az1")
