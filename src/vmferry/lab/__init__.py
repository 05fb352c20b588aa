"""The local lab: N hosts in network namespaces. Never imported by the core."""

from vmferry.lab.lab import Lab, default_lab_dir

__all__ = ["Lab", "default_lab_dir"]
