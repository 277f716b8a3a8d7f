"""Atomic file output: write to a temporary file in the destination folder, then rename.

Every writer of checkpoints, ONNX models, engines and reports goes through :func:`atomic_path`, so a run
killed halfway never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qdetr_deploy.errors import QDetrError


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, with one line, when ``path`` cannot be written (missing or read-only folder)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise QDetrError(f"output folder {folder} does not exist", path)
    if not os.access(folder, os.W_OK):
        raise QDetrError(f"output folder {folder} is not writable", path)
    if path.is_dir():
        raise QDetrError("output path is a directory", path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it."""
    path = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent or ".")
    except OSError as e:  # read-only file system, no permission (as root, chmod alone does not stop us)
        raise QDetrError(f"cannot write in {path.parent or '.'}: {e.strerror or e}", path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides, as for open()
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning every failure into a one-line :class:`QDetrError`."""
    path = Path(path)
    if not path.is_file():
        raise QDetrError("file not found", path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise QDetrError("not a text (JSON) file", path) from None
    except json.JSONDecodeError as e:
        raise QDetrError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from None
