#!/usr/bin/env bash
# Idempotent set-up used by `make demo` and `make test`: Debian packages, then a virtualenv.
# Fast when everything is present (no apt or pip call is made then).
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PKGS=(qemu-system-x86 qemu-utils busybox-static iproute2 gcc libc6-dev cpio etcd-server etcd-client
  tcpdump  # tcpdump: the encrypted-migration test captures the migration link
  chromium)  # chromium: tests only (tests/browser drives it with Playwright; no browser download)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then missing+=(python3-venv); fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]} — run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU older than 9.0 loses guest writes during a migration under TCG (its dirty-bitmap sync
# left stale TLB entries; fixed upstream in 9.0): migrated lab guests crashed now and then.
# Debian bookworm ships 7.2, so take QEMU from bookworm-backports there.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
if [ "$(qemu_major || true)" = "" ] || [ "$(qemu_major)" -lt 9 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: QEMU >= 9.0 is needed (found $(qemu_major || echo none)) — run as root" >&2
    exit 1
  fi
  . /etc/os-release
  export DEBIAN_FRONTEND=noninteractive
  if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
    echo "setup: installing QEMU from bookworm-backports"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' \
      > /etc/apt/sources.list.d/vmferry-backports.list
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
      qemu-system-x86 qemu-utils >/dev/null
  else
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
  fi
  [ "$(qemu_major)" -ge 9 ] || { echo "setup: could not install QEMU >= 9.0" >&2; exit 1; }
fi

stamp=.venv/.setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating virtualenv .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
