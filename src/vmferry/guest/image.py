"""Guest image builder: Debian cloud kernel plus a busybox + probe initramfs.

The image is cached under ``<cache>/images/<digest>/`` where the digest is a
sha256 over every build input, so it is rebuilt only when an input changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger("vmferry.guest")

#: Bump when the image layout or build procedure changes.
FORMAT_VERSION = "1"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PATH = Path("/bin/busybox")
PROBE_ROLES = ("heartbeat", "udpecho", "tcpecho", "dirty", "disk", "power")
DEFAULT_ROLES = ("heartbeat", "udpecho", "tcpecho", "power")
#: Kernel modules loaded by init.sh, in load order.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "button",
    "evdev",
)
KERNEL_CMDLINE_BASE = ("console=ttyS0", "quiet", "panic=-1")

_KERNEL_STAMP = ".vmferry-complete"
_DIRTY_RE = re.compile(r"^[0-9]+[KMGkmg]?@[0-9]+[KMGkmg]?(:full)?$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_APT_LISTS = Path("/var/lib/apt/lists")
_resolved: dict[int, KernelPackage] = {}  # apt lists mtime -> package
_DISK_RE = re.compile(r"^/dev/[A-Za-z0-9_./-]+$")


class ImageBuildError(RuntimeError):
    """Raised when the guest image cannot be built."""


@dataclass(frozen=True)
class KernelPackage:
    """A concrete Debian kernel image package."""

    name: str
    version: str

    @property
    def release(self) -> str:
        """Kernel release (``uname -r``), e.g. ``6.1.0-56-cloud-amd64``."""
        return self.name.removeprefix("linux-image-")


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths plus the content digest."""

    kernel: Path
    initrd: Path
    digest: str
    kernel_version: str


# ---------------------------------------------------------------- helpers


def _run(cmd: Sequence[str], *, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    """Run a command, returning stdout; raise ImageBuildError on failure."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, input=stdin, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"command not found: {cmd[0]}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ImageBuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


def _source_bytes(name: str) -> bytes:
    """Read a packaged guest source file (probe.c, init.sh)."""
    return resources.files("vmferry.guest").joinpath(name).read_bytes()


def is_static_elf(data: bytes) -> bool:
    """True if ``data`` is a 64-bit little-endian ELF without a PT_INTERP segment."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == 3:  # PT_INTERP
            return False
    return True


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Serialise builds sharing one cache directory."""
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- kernel


def default_cache_dir() -> Path:
    """``$VMFERRY_CACHE`` or ``/var/cache/vmferry``; created if missing."""
    path = Path(os.environ.get("VMFERRY_CACHE") or "/var/cache/vmferry")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _apt_update() -> None:
    log.info("running apt-get update")
    _run(["apt-get", "update", "-q"])


def _lists_stamp() -> int:
    try:
        return _APT_LISTS.stat().st_mtime_ns
    except OSError:
        return 0


def resolve_kernel_package() -> KernelPackage:
    """Resolve the kernel package, memoised until the apt lists change."""
    stamp = _lists_stamp()
    pkg = _resolved.get(stamp)
    if pkg is None:
        pkg = _resolve_kernel_package()
        _resolved.clear()
        _resolved[_lists_stamp()] = pkg
    return pkg


def _resolve_kernel_package() -> KernelPackage:
    """Resolve the real kernel package behind ``linux-image-cloud-amd64``.

    One ``apt-cache show`` of the meta package usually yields both the name and
    the exact version (``Depends: linux-image-X (= V)``); ``apt-cache depends``
    plus a second lookup is the fallback. Empty apt lists trigger one update.
    """
    name = version = None
    for attempt in range(2):
        with contextlib.suppress(ImageBuildError):
            out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE])
            m = re.search(
                r"^Depends:.*?(linux-image-[^\s,<>()]+)(?:\s*\(=\s*([^)\s]+)\))?", out, re.M
            )
            if not m:
                out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
                m = re.search(r"^\s*\|?Depends:\s*(linux-image-[^\s<>]+)", out, re.M)
            if m:
                name = m.group(1)
                version = m.group(2) if m.lastindex and m.lastindex >= 2 else None
                break
        if attempt == 0:
            _apt_update()
    if name is None:
        raise ImageBuildError(f"cannot resolve {KERNEL_META_PACKAGE} with apt-cache")
    if version is None:
        out = _run(["apt-cache", "show", "--no-all-versions", name])
        mv = re.search(r"^Version:\s*(\S+)", out, re.M)
        if not mv:
            raise ImageBuildError(f"apt-cache show {name}: no Version field")
        version = mv.group(1)
    return KernelPackage(name=name, version=version)


def _cached_kernel_package(cache_dir: Path) -> KernelPackage | None:
    """Newest kernel already extracted in the cache (offline fallback)."""
    stamps = sorted(
        (cache_dir / "kernel").glob(f"*/{_KERNEL_STAMP}"), key=lambda p: p.stat().st_mtime
    )
    if not stamps:
        return None
    return KernelPackage(
        name="linux-image-" + stamps[-1].parent.name, version=stamps[-1].read_text().strip()
    )


def _download_deb(pkg: KernelPackage, debs: Path) -> Path:
    """``apt-get download`` the package into ``debs`` (reusing a matching .deb)."""
    for deb in debs.glob(f"{pkg.name}_*.deb"):
        with contextlib.suppress(ImageBuildError):
            if _run(["dpkg-deb", "-f", str(deb), "Version"]).strip() == pkg.version:
                return deb
    cmd = [
        "apt-get",
        "download",
        "-q",
        "-o",
        "APT::Sandbox::User=root",
        f"{pkg.name}={pkg.version}",
    ]
    log.info("downloading %s %s", pkg.name, pkg.version)
    try:
        _run(cmd, cwd=debs)
    except ImageBuildError:
        _apt_update()  # stale lists: the archive may have dropped that version
        _run(cmd, cwd=debs)
    for deb in debs.glob(f"{pkg.name}_*.deb"):
        if _run(["dpkg-deb", "-f", str(deb), "Version"]).strip() == pkg.version:
            return deb
    raise ImageBuildError(f"apt-get download produced no .deb for {pkg.name}")


def fetch_kernel(cache_dir: Path, package: KernelPackage | None = None) -> Path:
    """Download and extract the cloud kernel package; return the extraction root.

    The kernel is never installed on the host: the .deb is unpacked with
    ``dpkg-deb -x`` into ``cache_dir/kernel/<release>/``, reused when present.
    """
    pkg = package or resolve_kernel_package()
    dest = cache_dir / "kernel" / pkg.release
    stamp = dest / _KERNEL_STAMP
    if stamp.is_file() and stamp.read_text().strip() == pkg.version:
        return dest
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _download_deb(pkg, debs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{pkg.release}-", dir=dest.parent))
    try:
        log.info("extracting %s", deb.name)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        (tmp / _KERNEL_STAMP).write_text(pkg.version + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _kernel_files(kdir: Path, release: str) -> tuple[Path, dict[str, Path]]:
    """Locate vmlinuz and the guest modules inside an extracted kernel package."""
    vmlinuz = kdir / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise ImageBuildError(f"{vmlinuz} missing from kernel package")
    mods: dict[str, Path] = {}
    for base in (kdir / "lib" / "modules" / release, kdir / "usr" / "lib" / "modules" / release):
        for ko in base.rglob("*.ko"):
            mods.setdefault(ko.stem, ko)
    missing = [m for m in GUEST_MODULES if m not in mods]
    if missing:
        raise ImageBuildError(
            f"kernel {release} lacks modules (or they are compressed): " + ", ".join(missing)
        )
    return vmlinuz, {m: mods[m] for m in GUEST_MODULES}


# ---------------------------------------------------------------- build


def compute_digest(
    *,
    probe_src: bytes,
    init_src: bytes,
    busybox: bytes,
    kernel_package: str,
    modules: Sequence[str] = GUEST_MODULES,
) -> str:
    """sha256 over all image inputs, length-framed so fields cannot alias."""
    h = hashlib.sha256()
    fields: list[bytes] = [
        b"vmferry-guest",
        FORMAT_VERSION.encode(),
        probe_src,
        init_src,
        busybox,
        kernel_package.encode(),
        "\n".join(modules).encode(),
    ]
    for f in fields:
        h.update(len(f).to_bytes(8, "little"))
        h.update(f)
    return h.hexdigest()


def compile_probe(output: Path, source: bytes | None = None, *, static: bool = True) -> Path:
    """Compile probe.c into ``output`` (statically by default)."""
    src = source if source is not None else _source_bytes("probe.c")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmferry-probe-") as td:
        c_file = Path(td) / "probe.c"
        c_file.write_bytes(src)
        cmd = [
            "gcc",
            *(["-static"] if static else []),
            "-O2",
            "-Wall",
            "-o",
            str(output),
            str(c_file),
        ]
        _run(cmd)
    return output


def _image_complete(out: Path) -> bool:
    return all((out / n).is_file() for n in ("vmlinuz", "initrd.cpio", "manifest.json"))


def _image_from_dir(out: Path) -> GuestImage:
    manifest = json.loads((out / "manifest.json").read_text())
    return GuestImage(
        kernel=out / "vmlinuz",
        initrd=out / "initrd.cpio",
        digest=out.name,
        kernel_version=str(manifest["kernel_version"]),
    )


def _assemble_root(
    root: Path, *, busybox: bytes, init_src: bytes, probe_src: bytes, modules: dict[str, Path]
) -> None:
    """Populate the initramfs tree."""
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("sbin", "usr/bin", "usr/sbin"):
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to("/bin")
    bb = root / "bin" / "busybox"
    bb.write_bytes(busybox)
    bb.chmod(0o755)
    applets = _run([str(bb), "--list"]).split()
    for applet in applets:
        if applet not in ("busybox", "probe") and "/" not in applet:
            (root / "bin" / applet).symlink_to("busybox")
    init = root / "init"
    init.write_bytes(init_src)
    init.chmod(0o755)
    probe = compile_probe(root / "bin" / "probe", probe_src)
    if not is_static_elf(probe.read_bytes()):
        raise ImageBuildError("compiled probe is not a static executable")
    for name, ko in modules.items():
        shutil.copyfile(ko, root / "lib" / "modules" / f"{name}.ko")
    (root / "etc" / "hostname").write_text("ferry\n")


def _pack_cpio(root: Path, output: Path) -> None:
    """Pack ``root`` as a newc cpio archive (entries sorted, owned by root)."""
    names = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        names.extend(str(Path(".") / rel / n) for n in sorted(dirnames + filenames))
    listing = "".join(f"{n}\n" for n in names).encode()
    with open(output, "wb") as fh:
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=listing,
            stdout=fh,
            stderr=subprocess.PIPE,
            check=False,
        )
    if proc.returncode != 0:
        raise ImageBuildError(f"cpio failed: {proc.stderr.decode(errors='replace')}")


def _remove_stale_temps(cache: Path) -> None:
    """Delete leftovers of interrupted builds (call with the cache lock held)."""
    for pattern in ("images/.tmp-*", "images/.old-*", "kernel/.tmp-*"):
        for stale in cache.glob(pattern):
            log.debug("removing stale %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def build_image(cache_dir: Path | None = None, force: bool = False) -> GuestImage:
    """Build (or reuse) the guest kernel + initramfs; see the module docstring."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    probe_src = _source_bytes("probe.c")
    init_src = _source_bytes("init.sh")
    try:
        busybox = BUSYBOX_PATH.read_bytes()
    except OSError as exc:
        raise ImageBuildError(f"cannot read {BUSYBOX_PATH} (install busybox-static)") from exc
    if not is_static_elf(busybox):
        raise ImageBuildError(f"{BUSYBOX_PATH} is not statically linked (need busybox-static)")
    try:
        pkg = resolve_kernel_package()
    except ImageBuildError:
        cached = _cached_kernel_package(cache)
        if cached is None:
            raise
        log.warning("apt lookup failed; using cached kernel %s %s", cached.name, cached.version)
        pkg = cached
    digest = compute_digest(
        probe_src=probe_src,
        init_src=init_src,
        busybox=busybox,
        kernel_package=f"{pkg.name}={pkg.version}",
    )
    images = cache / "images"
    out = images / digest
    if not force and _image_complete(out):
        log.debug("guest image %s is cached", digest[:12])
        return _image_from_dir(out)
    with _locked(cache):
        if not force and _image_complete(out):  # built by a concurrent process
            return _image_from_dir(out)
        started = time.monotonic()
        _remove_stale_temps(cache)
        kdir = fetch_kernel(cache, pkg)
        vmlinuz, modules = _kernel_files(kdir, pkg.release)
        images.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=images))
        try:
            log.info("building guest image %s (kernel %s)", digest[:12], pkg.release)
            root = tmp / "root"
            _assemble_root(
                root, busybox=busybox, init_src=init_src, probe_src=probe_src, modules=modules
            )
            _pack_cpio(root, tmp / "initrd.cpio")
            shutil.rmtree(root)
            shutil.copyfile(vmlinuz, tmp / "vmlinuz")
            manifest = {
                "digest": digest,
                "format": FORMAT_VERSION,
                "kernel_package": pkg.name,
                "kernel_package_version": pkg.version,
                "kernel_version": pkg.release,
                "modules": list(GUEST_MODULES),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; QEMU may run as another user
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{digest[:12]}-", dir=images))
                out.rename(old / "img")
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("guest image %s built in %.1fs", digest[:12], time.monotonic() - started)
    return _image_from_dir(out)


# ---------------------------------------------------------------- cmdline


def validate_roles(roles: Sequence[str] | str) -> tuple[str, ...]:
    """Normalise roles (list or comma string), dropping duplicates; ValueError if unknown."""
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    result: list[str] = []
    for role in items:
        role = role.strip()
        if not role:
            continue
        if role not in PROBE_ROLES:
            raise ValueError(f"unknown probe role {role!r} (valid: {', '.join(PROBE_ROLES)})")
        if role not in result:
            result.append(role)
    return tuple(result)


def guest_cmdline(
    ip: str | None,
    roles: Sequence[str],
    *,
    gateway: str | None = None,
    hostname: str | None = None,
    dirty: str | None = None,
    disk: str | None = None,
) -> str:
    """Kernel command line for the guest; ``ip`` must be ``A.B.C.D/NN``.

    Empty ``roles`` lets init pick its defaults (heartbeat,udpecho,tcpecho,power).
    """
    parts = list(KERNEL_CMDLINE_BASE)
    if ip is not None:
        if "/" not in ip:
            raise ValueError(f"guest ip {ip!r} needs a prefix length, e.g. 10.0.0.2/24")
        try:
            iface = ipaddress.IPv4Interface(ip)
        except ValueError as exc:
            raise ValueError(f"invalid guest ip {ip!r}: {exc}") from exc
        parts.append(f"ferry.ip={iface.with_prefixlen}")
    if gateway is not None:
        if ip is None:
            raise ValueError("gateway given without an ip")
        try:
            parts.append(f"ferry.gw={ipaddress.IPv4Address(gateway)}")
        except ValueError as exc:
            raise ValueError(f"invalid gateway {gateway!r}") from exc
    if hostname is not None:
        if not _HOSTNAME_RE.match(hostname):
            raise ValueError(f"invalid hostname {hostname!r}")
        parts.append(f"ferry.hostname={hostname}")
    valid = validate_roles(roles)
    if valid:
        parts.append("ferry.roles=" + ",".join(valid))
    if dirty is not None:
        if not _DIRTY_RE.match(dirty):
            raise ValueError(f"invalid dirty spec {dirty!r} (want SIZE@RATE[:full], e.g. 128M@0)")
        parts.append(f"ferry.dirty={dirty}")
    if disk is not None:
        if not _DISK_RE.match(disk):
            raise ValueError(f"invalid disk device {disk!r} (want /dev/...)")
        parts.append(f"ferry.disk={disk}")
    return " ".join(parts)
