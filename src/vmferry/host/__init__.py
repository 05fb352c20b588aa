"""One host: VM specs and lifecycle, virtual switches, storage roots, host settings."""

from vmferry.host.host import Host
from vmferry.host.settings import HostSettings, HostSettingsUpdate, SwitchSpec
from vmferry.host.spec import VMCreate, VMSpec
from vmferry.host.vms import VMInfo, VMManager, VMState

__all__ = [
    "Host",
    "HostSettings",
    "HostSettingsUpdate",
    "SwitchSpec",
    "VMCreate",
    "VMInfo",
    "VMManager",
    "VMSpec",
    "VMState",
]
