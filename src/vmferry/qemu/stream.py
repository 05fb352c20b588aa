"""Settings of QEMU's migration stream that both a live move and a save to a file depend on."""

from __future__ import annotations

#: QEMU's default 128 MiB/s cap would throttle every move and save; this is "no cap".
UNLIMITED_BPS = 1 << 40

#: Capabilities a live move may turn on in a QEMU (``migration/qemu_ops.set_capabilities``).
#: A QEMU keeps them after a failed move, so a save turns them all off first.
MOVE_CAPABILITIES = (
    "multifd",
    "postcopy-ram",
    "postcopy-preempt",
    "pause-before-switchover",
    "auto-converge",
    "xbzrle",
)


def all_off() -> dict[str, list[dict[str, object]]]:
    """The ``migrate-set-capabilities`` arguments that turn every move capability off."""
    return {"capabilities": [{"capability": c, "state": False} for c in MOVE_CAPABILITIES]}
