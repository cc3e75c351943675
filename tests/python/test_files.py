"""Files linquant writes are replaced whole or not at all (python/linquant/_files.py)."""

import json
import os
import re

import pytest

from linquant._files import atomic_write, make_directory, write_json


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


def _private_file(directory):
    path = directory / "private"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def restore_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_a_written_file_gets_the_mode_of_a_plain_open(tmp_path, restore_umask, mask):
    # mkstemp's 0600 used to survive the rename: a saved model that no other user could read.
    os.umask(mask)
    with open(tmp_path / "plain", "w"):
        pass
    expected = 0o666 & ~mask
    assert os.stat(tmp_path / "plain").st_mode & 0o777 == expected
    write_json(str(tmp_path / "rows.json"), {"rows": []})
    atomic_write(str(tmp_path / "model.pt"), lambda tmp: open(tmp, "wb").close())
    # A writer that replaces the file it is given with its own 0600 one, as safetensors does.
    atomic_write(str(tmp_path / "model.safetensors"), lambda tmp: os.replace(_private_file(tmp_path), tmp))
    for name in ("rows.json", "model.pt", "model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name
    write_json(str(tmp_path / "rows.json"), {"rows": [1]})  # replacing a file gives it the same mode
    assert os.stat(tmp_path / "rows.json").st_mode & 0o777 == expected


def test_a_directory_target_blocked_by_a_file_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"--out must be a directory, but '{blocker}' is an existing file")):
        make_directory(str(blocker), "--out")
    message = f"--out '{blocker}/sub/dir' cannot be made a directory: '{blocker}' is a file"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_directory(str(blocker / "sub" / "dir"), "--out")
    assert os.listdir(tmp_path) == ["file"]
    make_directory(str(tmp_path / "new" / "dir"), "--out")
    make_directory(str(tmp_path / "new" / "dir"), "--out")  # an existing directory is fine
    assert (tmp_path / "new" / "dir").is_dir()


def test_a_saved_model_is_readable_by_others(tmp_path, restore_umask):
    # safetensors writes through its own 0600 temporary: the saved pair must still get the umask's mode.
    import torch
    import linquant as lq
    os.umask(0o022)
    model = lq.quantize_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), bits=8, exclude=[])
    lq.save_quantized(model, str(tmp_path))
    for name in ("model.safetensors", "linquant.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
