"""`write_atomic`: a file is replaced whole or not at all, with the permissions asked for."""

import os
import stat

import pytest

from echocare_core.files import write_atomic


def test_a_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    path = write_atomic(tmp_path / "metrics.json", "old")
    assert path.read_text() == "old"

    def broken(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left
    write_atomic(path, b"new", mode=0o600, durable=True)
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    write_atomic(path, lambda tmp: tmp.write_text("written by a function"))
    assert path.read_text() == "written by a function"
