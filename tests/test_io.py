"""Atomic writes (`medi.io`): the mode of what they leave, and nothing half-written on failure."""
from __future__ import annotations

import os
import stat

import pytest

from medi import io


@pytest.fixture
def mask():
    """Set the umask for one test, then put the old one back."""
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_take_the_mode_a_plain_open_gives(tmp_path, mask, umask, mode):
    mask(umask)
    assert io.umask() == umask
    io.write_json(tmp_path / "out" / "m.json", {"a": 1})
    io.write_text(tmp_path / "out" / "t.txt", "x")
    (tmp_path / "out" / "plain").write_text("x")
    for name in ("m.json", "t.txt", "plain"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == mode, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics" / "metrics.json"
    io.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert io.read_json(target) == {"old": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
