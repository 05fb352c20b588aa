"""One host: its settings, its VMs, and what it reports about itself."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from vmferry import __version__
from vmferry.errors import ConflictError
from vmferry.host import network
from vmferry.host.settings import (
    HostSettings,
    HostSettingsUpdate,
    SettingsStore,
    kvm_usable,
    merged,
)
from vmferry.host.vms import ImageProvider, VMManager, VMState, default_image, meminfo


def cpu_info() -> dict[str, Any]:
    """Vendor, model and feature flags of the host CPU (from /proc/cpuinfo)."""
    info: dict[str, Any] = {"vendor": "unknown", "model": "unknown", "flags": []}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, val = (part.strip() for part in line.partition(":"))
        if key == "vendor_id":
            info["vendor"] = val
        elif key == "model name":
            info["model"] = val
        elif key == "flags":
            info["flags"] = val.split()
            break
    return info


class Host:
    """The facade the API calls: settings and VMs of this host."""

    def __init__(self, state_dir: Path, image: ImageProvider = default_image) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = SettingsStore(state_dir)
        self.settings = self.store.load()
        self.vms = VMManager(state_dir, lambda: self.settings, image)
        self._settings_lock = asyncio.Lock()

    async def apply_switches(self) -> None:
        """Make sure every configured virtual switch's bridge exists."""
        for sw in self.settings.switches.values():
            await asyncio.to_thread(network.ensure_switch, sw.bridge, sw.uplink)

    async def update_settings(self, update: HostSettingsUpdate) -> HostSettings:
        """Validate and apply a settings change; refused changes leave everything as it was."""
        async with self._settings_lock:
            new = merged(self.settings, update)
            in_use = {
                n.switch: vm.name
                for vm in self.vms.list()
                if vm.state is not VMState.OFF
                for n in vm.nics
            }
            for sw, vm_name in in_use.items():
                if sw not in new.switches:
                    raise ConflictError(
                        f"switch {sw!r} is used by VM {vm_name!r}",
                        field="switches",
                        fix="stop or delete the VM first",
                    )
            for vm in self.vms.list():
                if not any(Path(vm.storage_dir).is_relative_to(r) for r in new.storage_roots):
                    raise ConflictError(
                        f"VM {vm.name!r} lives in {vm.storage_dir}, outside the new storage roots",
                        field="storage_roots",
                        fix="keep a root that holds it, or move the VM's storage first",
                    )
            for spec in new.switches.values():
                await asyncio.to_thread(network.ensure_switch, spec.bridge, spec.uplink)
            self.store.save(new)
            self.settings = new
            return new

    async def info(self) -> dict[str, Any]:
        """What ``ferry host show`` prints."""
        mem = meminfo()
        cpu = cpu_info()
        roots = []
        for r in self.settings.storage_roots:
            usage = shutil.disk_usage(r) if Path(r).is_dir() else None
            roots.append({"path": r, "free_mib": usage.free // 2**20 if usage else None})
        switches = [
            {
                "name": name,
                "bridge": sw.bridge,
                "uplink": sw.uplink,
                "present": await asyncio.to_thread(network.link_exists, sw.bridge),
            }
            for name, sw in sorted(self.settings.switches.items())
        ]
        vms = self.vms.list()
        return {
            "name": self.settings.name,
            "version": __version__,
            "kernel": platform.release(),
            "accelerator": self.settings.accelerator,
            "kvm_usable": kvm_usable(),
            "cpu_vendor": cpu["vendor"],
            "cpu_model": cpu["model"],
            "cpu_count": os.cpu_count() or 1,
            "memory_total_mib": mem["MemTotal"],
            "memory_available_mib": mem["MemAvailable"],
            "memory_reserve_mib": self.settings.memory_reserve_mib,
            "memory_free_for_vms_mib": self.vms.free_memory_mib(),
            "storage_roots": roots,
            "switches": switches,
            "vms_total": len(vms),
            "vms_running": sum(1 for v in vms if v.state is VMState.RUNNING),
        }
