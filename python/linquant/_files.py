"""Every file linquant writes goes through here: written beside its final name, synced, then
renamed over it, so a reader (or a crash) never sees half a file."""

import contextlib
import json
import os
import secrets
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path`. The file
    gets the mode a plain open() would give it (0o666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    # Keep the final name at the end: writers such as torch.jit.save derive things from it.
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
    # Not mkstemp: its 0600 would survive the rename and hide a saved model from other users.
    # O_EXCL with a 64-bit random name never takes over someone else's file. The mode this creation
    # gets (the umask applied) is set again after writing: writers that replace the file they are
    # given, as safetensors' save_file does with its own temporary, leave theirs at 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def check_directory_target(path: str, name: str) -> None:
    """`path` is a directory or can be made one: the nearest existing path on the way is a
    directory. `name` says which argument it is (e.g. "--out") in the error."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(existing):
        return
    if existing == os.path.abspath(path):
        raise ValueError(f"{name} must be a directory, but {path!r} is an existing file")
    raise ValueError(f"{name} {path!r} cannot be made a directory: {existing!r} is a file")


def make_directory(path: str, name: str) -> None:
    check_directory_target(path, name)
    os.makedirs(path, exist_ok=True)
