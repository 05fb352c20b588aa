"""vmferry: live migration and failover clustering for QEMU/KVM hosts."""

__version__ = "0.1.0"
