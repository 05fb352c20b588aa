"""``python -m vmferry.guest``: build the guest image and print its paths."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vmferry.guest.image import ImageBuildError, build_image


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the guest image; print kernel, initrd, digest, version."""
    ap = argparse.ArgumentParser(prog="python -m vmferry.guest", description=__doc__)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $VMFERRY_CACHE")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("-q", "--quiet", action="store_true", help="only print the paths")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s"
    )
    try:
        img = build_image(args.cache_dir, force=args.force)
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel={img.kernel}")
    print(f"initrd={img.initrd}")
    print(f"digest={img.digest}")
    print(f"kernel_version={img.kernel_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
