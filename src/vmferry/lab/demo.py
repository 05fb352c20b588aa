"""``make demo``: a 2-host lab, a VM booted on h1, then moved live to h2 while a TCP session
and a 1 ms UDP echo run against it from the lab's client namespace.

Each step is a real ``ferry`` command, printed before it runs, so the demo doubles as a tour of
the CLI. The demo fails (non-zero exit) if the move fails or the TCP session drops. ``--keep``
leaves the lab up to explore.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

FERRY = str(Path(sys.executable).with_name("ferry"))


def _run(*args: str, capture: bool = False) -> str:
    shown = "ferry " + " ".join(shlex.quote(a) for a in args)
    print(f"\n\033[1m$ {shown}\033[0m", flush=True)
    done = subprocess.run([FERRY, *args], text=True, capture_output=capture, check=False)
    if capture:
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"demo: `{shown}` failed (exit {done.returncode})")
    return done.stdout if capture else ""


def main(argv: list[str] | None = None) -> None:
    """Run the demo."""
    ap = argparse.ArgumentParser(prog="vmferry.lab.demo")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args(argv)
    ok = False
    _run("lab", "down")  # a lab left over from an earlier demo
    try:
        _run("image", "build")
        status = json.loads(_run("lab", "up", "--hosts", "2", "--output", "json", capture=True))
        vm_net = status["vm_cidr"]
        ip = vm_net.rsplit(".", 1)[0] + ".11"
        _run(
            "--host", "h1", "vm", "create", "demo1", "--memory", "256", "--disk", "64",
            "--nic", "external", "--ip", f"{ip}/24", "--start",
        )  # fmt: skip
        print(f"\nwaiting for the guest at {ip} to answer (boots in a few seconds under TCG) …")
        t0 = time.monotonic()
        while True:
            done = subprocess.run(
                [FERRY, "lab", "probe", "stat", ip, "--output", "json"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                break
            if time.monotonic() - t0 > 90:
                raise SystemExit("demo: the guest did not answer within 90 s")
            time.sleep(0.5)
        print(f"guest answered after {time.monotonic() - t0:.1f} s")
        _run("lab", "probe", "udp", ip, "--count", "5")
        _run("lab", "probe", "tcp", ip, "--count", "5")
        _run("lab", "probe", "stat", ip)
        _run("--host", "h1", "vm", "list")
        _run("doctor", "h1", "h2")
        _move_live(ip)
        _run("--host", "h2", "vm", "list")
        ok = True
    finally:
        if args.keep and ok:
            print("\nthe lab is still up: try `ferry --host h1 vm list`, then `ferry lab down`.")
        else:
            _run("lab", "down")
    print("\ndemo finished: the guest answered from h1, then moved live to h2 with its TCP session "
          "open.")  # fmt: skip


def _move_live(ip: str) -> None:
    """``ferry move demo1 --to h2`` with a TCP session and a 1 ms UDP echo held to the guest."""
    from vmferry.lab import Lab
    from vmferry.lab.lab import default_lab_dir, start_probe

    lab = Lab(default_lab_dir())
    print(f"\nholding a TCP session to {ip} and a 1 ms UDP echo stream during the move …")
    session = start_probe(lab, "session", ip, duration=120)
    blackout = start_probe(lab, "blackout", ip, duration=120)
    try:
        _run("move", "demo1", "--to", "h2")
    finally:
        time.sleep(1.0)  # let the echo stream see the guest answer from h2
        held, gaps = session.stop(), blackout.stop()
    job = json.loads(_run("--host", "h1", "migration", "list", "--output", "json", capture=True))
    if job:
        _run("--host", "h1", "migration", "show", str(job[0]["id"]), "--trace")
    print(f"\nTCP session: {held.get('lines', 0)} echoes, "
          f"{'kept' if held.get('ok') and not held.get('reset') else 'DROPPED'}; "
          f"longest gap in the UDP echo (what the guest's peers saw): "
          f"{gaps.get('longest_gap_ms', float('nan')):.0f} ms")  # fmt: skip
    if not held.get("ok") or held.get("reset"):
        raise SystemExit(f"demo: the TCP session did not survive the move: {held}")


if __name__ == "__main__":
    main()
