"""Storage-root confinement: every VM path stays under a root."""

from pathlib import Path

import pytest

from vmferry.errors import OutsideStorageRootError, RefusedError
from vmferry.host.storage import resolve_under_roots


def test_relative_name_goes_under_first_root(tmp_path: Path) -> None:
    assert resolve_under_roots("vm1", [str(tmp_path)], "storage_dir") == tmp_path / "vm1"


def test_absolute_path_under_second_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert resolve_under_roots(str(b / "x"), [str(a), str(b)], "storage_dir") == b / "x"


@pytest.mark.parametrize("value", ["../escape", "a/../../escape", "/etc", "/", "/tmp/elsewhere"])
def test_escapes_are_refused(tmp_path: Path, value: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(OutsideStorageRootError) as exc:
        resolve_under_roots(value, [str(root)], "storage_dir")
    assert exc.value.field == "storage_dir"
    assert exc.value.fix


def test_symlink_inside_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    with pytest.raises(OutsideStorageRootError, match="symlink"):
        resolve_under_roots("link/vm", [str(root)], "storage_dir")


def test_no_roots_is_refused() -> None:
    with pytest.raises(RefusedError, match="no storage roots"):
        resolve_under_roots("vm", [], "storage_dir")
