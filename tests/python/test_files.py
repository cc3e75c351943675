"""Files linquant writes are replaced whole or not at all (python/linquant/_files.py)."""

import json
import os

import pytest

from linquant._files import atomic_write, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "rows.json"
    write_json(str(path), {"rows": [1]})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"rows": [')  # half written
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fail)
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert os.listdir(tmp_path) == ["rows.json"]


def test_the_temporary_keeps_the_final_name_at_its_end(tmp_path):
    seen = []
    atomic_write(str(tmp_path / "model.pt"), lambda tmp: (seen.append(tmp), open(tmp, "w").close()))
    assert os.path.basename(seen[0]).startswith(".tmp-") and seen[0].endswith("-model.pt")
    assert os.listdir(tmp_path) == ["model.pt"]
