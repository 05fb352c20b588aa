"""The Admin Center in a real browser in front of a 2-node failover cluster on the lab's etcd:
the cluster on the dashboard, Drain and Resume of a node as an admin, a move to the best
possible node through the wizard, and what an operator sees (no Drain; a forged drain refused).

The cluster and the clustered VM come from the integration tests' own helpers
(``ha_cluster``, ``_ha_vm``: a VM on the lab's shared volume, made clustered on h1).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from browser_support import (
    ARTIFACTS,
    AdminCenter,
    admin_token,
    log_in,
    needs_browser,
    needs_lab,
    off_loop,
    off_loop_cm,
    vm_names,
    wait_for,
)
from test_cluster_moves import _ha_vm, _node, _owner
from test_failover import _forget_everywhere, ha_cluster

from vmferry.cluster.store import ClusterVMStore

pytestmark = [*needs_browser, *needs_lab, pytest.mark.slow]

CLUSTER = "webc"
VM = "webha1"
ENDED = ", ".join(f'.progress-line[data-state="{s}"]' for s in ("completed", "failed", "cancelled"))


def _status(lab: Any) -> dict[str, Any]:
    with lab.client("h2") as c:
        st: dict[str, Any] = c.cluster_status(CLUSTER)
    return st


def _runs_only_on(lab: Any, host: str) -> bool:
    """The VM is registered on ``host`` and on no other host (the agents' view)."""
    other = "h2" if host == "h1" else "h1"
    return vm_names(lab, host) == [VM] and VM not in vm_names(lab, other)


def _dashboard(page: Any, ac: AdminCenter) -> None:
    page.goto(ac.url + "/")
    page.wait_for_selector("#cluster")


def _node_text(page: Any, node: str) -> str:
    return str(page.locator(f'#cluster tr[data-node="{node}"]').inner_text())


def test_drain_resume_and_best_node_move_as_admin_and_no_drain_for_an_operator(
    lab_etcd: Any, admin_center_etcd: AdminCenter, chromium: Any
) -> None:
    lab, ac = lab_etcd, admin_center_etcd
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with off_loop_cm(ha_cluster(lab, CLUSTER)) as etcd:
            store = ClusterVMStore(etcd)
            ip, _ = off_loop(lambda: _ha_vm(lab, "h1", VM))
            hb = off_loop(lambda: lab.stat(ip))["hb"]

            # -- an operator sees the cluster but gets no Drain; a forged drain is refused --
            op_ctx, op = log_in(chromium, ac, admin_token(ac, "operator")["token"])
            try:
                for node in ("h1", "h2"):
                    assert "up" in _node_text(op, node)
                assert op.locator("#cluster button", has_text="Drain").count() == 0
                assert op.locator("#cluster button", has_text="Resume").count() == 0
                op.screenshot(path=str(ARTIFACTS / "c1-operator-dashboard.png"), full_page=True)
                # the form post a Drain button would send, from the operator's session
                r = op_ctx.request.post(
                    ac.url + f"/cluster/{CLUSTER}/nodes/h1/drain", max_redirects=0
                )
                assert r.status == 403
                assert "role operator (operator) may not do this: it needs admin" in r.text()
                assert not _node(off_loop(lambda: _status(lab)), "h1")["paused"]
            finally:
                op_ctx.close()

            # -- the admin: cluster, nodes and the clustered VM with its owner --------------
            tok = admin_token(ac, "admin")
            assert tok["role"] == "admin"
            ctx, page = log_in(chromium, ac, tok["token"])
            try:
                assert f"Cluster {CLUSTER}" in page.inner_text("#cluster h2")
                for node in ("h1", "h2"):
                    text = _node_text(page, node)
                    assert "up" in text and "alive" in text, text
                assert VM in _node_text(page, "h1") and VM not in _node_text(page, "h2")
                vm_row = page.locator(f'tr[data-vm="{VM}"]')
                cells = vm_row.locator("td")
                assert "clustered" in cells.nth(0).inner_text()
                assert cells.nth(1).inner_text() == "running" and cells.nth(2).inner_text() == "h1"
                page.screenshot(path=str(ARTIFACTS / "c2-cluster-dashboard.png"), full_page=True)

                # -- Drain h1: the VM moves live to h2, h1 is paused ------------------------
                with page.expect_navigation():  # the form posts, then returns to "/"
                    page.locator('#cluster tr[data-node="h1"] button', has_text="Drain").click()
                assert page.url == ac.url + "/", page.inner_text("main")  # not an error page
                off_loop(lambda: wait_for(lambda: _runs_only_on(lab, "h2"), 180, "VM on h2"))
                assert off_loop(
                    lambda: wait_for(
                        lambda: _owner(store, CLUSTER, VM) == ("h2", None), 30, "owner h2"
                    )
                )
                st = off_loop(
                    lambda: wait_for(
                        lambda: (
                            (s := _status(lab))
                            and (_node(s, "h1").get("drain") or {}).get("status") == "done"
                            and s
                        ),
                        60,
                        "the drain to be done",
                    )
                )
                h1 = _node(st, "h1")
                assert h1["state"] == "paused" and h1["paused"], h1
                assert h1["drain"]["moved"] == {VM: "h2"}, h1["drain"]
                _dashboard(page, ac)
                text = _node_text(page, "h1")
                assert "paused" in text and "drain done: 1 moved" in text, text
                assert page.locator(f'tr[data-vm="{VM}"] td').nth(2).inner_text() == "h2"
                assert VM in _node_text(page, "h2")
                h1_row = page.locator('#cluster tr[data-node="h1"]')
                assert h1_row.locator("button", has_text="Drain").count() == 0
                page.screenshot(path=str(ARTIFACTS / "c3-drained.png"), full_page=True)
                assert off_loop(lambda: lab.stat(ip))["hb"] > hb, "the guest restarted"

                # -- Resume h1 (no fail-back): up again, the VM stays on h2 ------------------
                with page.expect_navigation():
                    h1_row.locator("button", has_text="Resume").click()
                assert page.url == ac.url + "/", page.inner_text("main")  # not an error page
                h1 = _node(off_loop(lambda: _status(lab)), "h1")
                assert h1["state"] == "up" and not h1["paused"], h1
                _dashboard(page, ac)
                h1_row = page.locator('#cluster tr[data-node="h1"]')
                assert "up" in h1_row.inner_text() and "paused" not in h1_row.inner_text()
                assert h1_row.locator("button", has_text="Drain").count() == 1
                assert off_loop(lambda: _runs_only_on(lab, "h2"))

                # -- the wizard: best possible node (h1, the only other node up) ------------
                page.locator(f'tr[data-vm="{VM}"] a', has_text="Move").first.click()
                page.wait_for_url(re.compile(r"/move\?vm="))
                assert "clustered" in page.inner_text("h1")
                # the cluster keeps a clustered VM's files on the shared volume: no choice
                assert page.locator("input[name=storage]").count() == 0
                assert "stay on the shared volume" in page.inner_text("#storage-choice")
                page.check('input[name=destination][value="best"]')
                page.check('input[name=mode][value="live"]')
                page.click("#what-if-button")
                page.wait_for_selector("#what-if .what-if")
                result = page.inner_text("#what-if")
                page.screenshot(path=str(ARTIFACTS / "c4-best-what-if.png"), full_page=True)
                assert "every check passed" in result, result
                assert "Checked against h1" in result, result
                assert f"VM files go to {lab.lab.shared_dir / VM}" in result, result
                page.click("#start-button")
                page.wait_for_url(re.compile(r"/migrations/h2/[0-9a-f]+$"))
                page.wait_for_selector(ENDED, timeout=180_000)
                state = page.inner_text("#job-state").strip()
                page.screenshot(path=str(ARTIFACTS / "c5-best-move.png"), full_page=True)
                assert state == "completed", page.inner_text("main")
                off_loop(lambda: wait_for(lambda: _runs_only_on(lab, "h1"), 60, "VM on h1"))
                assert off_loop(
                    lambda: wait_for(
                        lambda: _owner(store, CLUSTER, VM) == ("h1", None), 30, "owner h1"
                    )
                )
                _dashboard(page, ac)
                assert page.locator(f'tr[data-vm="{VM}"] td').nth(2).inner_text() == "h1"
                assert VM in _node_text(page, "h1")
                page.screenshot(path=str(ARTIFACTS / "c6-back-on-h1.png"), full_page=True)
                assert off_loop(lambda: lab.stat(ip))["hb"] > hb, "the guest restarted"
            finally:
                ctx.close()
    finally:
        off_loop(lambda: _forget_everywhere(lab, VM, "h1"))
    audit = [
        json.loads(ln) for ln in (ac.state_dir / "audit" / "audit.jsonl").read_text().splitlines()
    ]
    acts = {(r["cn"], r["message"], r["outcome"]) for r in audit}
    assert ("admin", f"drain h1 of {CLUSTER}", "ok") in acts
    assert ("admin", f"resume h1 of {CLUSTER}", "ok") in acts
    assert ("admin", f"move {VM} to best", "ok") in acts
    refused = [r for r in audit if r["cn"] == "operator" and r["outcome"] == "refused"]
    assert [r["message"].split(":")[0] for r in refused] == [f"drain h1 of {CLUSTER}"], refused
