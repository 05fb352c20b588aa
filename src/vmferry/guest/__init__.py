"""Guest image (kernel + busybox/probe initramfs) for vmferry test VMs."""

from vmferry.guest.image import (
    DEFAULT_ROLES,
    PROBE_ROLES,
    GuestImage,
    ImageBuildError,
    build_image,
    default_cache_dir,
    guest_cmdline,
    validate_roles,
)

__all__ = [
    "DEFAULT_ROLES",
    "PROBE_ROLES",
    "GuestImage",
    "ImageBuildError",
    "build_image",
    "default_cache_dir",
    "guest_cmdline",
    "validate_roles",
]
