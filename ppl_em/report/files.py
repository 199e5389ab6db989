"""A report directory on disk: what a report wrote, replacing it atomically, leftovers.

A report is a flat directory of ``REPORT_FILES``. ``index.html`` ends with a manifest
comment holding the SHA-256 of every file the report wrote (the page's own digest covers
its bytes before the comment), so ``force`` deletes a directory only if every path in it,
recursively and without following links, is a file the report wrote, unchanged.

The new report is built in a sibling ``.NAME.tmp-PID-XXXXXXXX`` and swapped with the old
one by one ``renameat2(RENAME_EXCHANGE)`` (Linux), so a kill at any moment leaves the old
report or the new one at the target. Without the exchange, the old report is first moved
to ``.NAME.old-PID-XXXXXXXX``; a kill before the new one moves in leaves no target, and
the next run puts the old report back. Every run first removes its target's leftovers:
so named, made by a process that is gone, holding nothing but report files.

Test seam: with ``PPL_EM_REPORT_STOP_AT=<step>`` (one of ``STEPS``) in the environment,
the writing process stops itself with SIGSTOP at that step, for a test to kill it there;
``kill -CONT PID`` resumes it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPORT_FILES = ("index.html", "report.json")
MANIFEST_HOLDER = "index.html"
MANIFEST_TAG = b"\n<!-- ppl_em report manifest: "
STOP_AT_ENV = "PPL_EM_REPORT_STOP_AT"
STEPS = ("tmp-partial", "tmp-complete", "old-moved", "swapped")
# Reports written before manifests existed are recognised by their page and JSON.
LEGACY_HEAD = b'<!DOCTYPE html><html lang="en"><head>'
LEGACY_KEYS = {"model_name", "em", "table"}
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_manifest(files: dict[str, str]) -> dict[str, bytes]:
    """The files as UTF-8 bytes, the holder page ending with the manifest of all of them."""
    raw = {name: text.encode("utf-8") for name, text in files.items()}
    digests = {name: _digest(data) for name, data in raw.items()}
    note = json.dumps({"version": 1, "sha256": digests}, sort_keys=True).encode()
    raw[MANIFEST_HOLDER] += MANIFEST_TAG + note + b" -->\n"
    return raw


def _manifest(directory: Path) -> dict[str, str]:
    """{name: sha256} of the files the report in ``directory`` wrote; {} if not a report."""
    holder = directory / MANIFEST_HOLDER
    if holder.is_symlink() or not holder.is_file():
        return {}
    data = holder.read_bytes()
    cut = data.rfind(MANIFEST_TAG)
    if cut < 0:
        return _legacy(directory, data)
    try:
        digests = json.loads(data[cut + len(MANIFEST_TAG) :].removesuffix(b" -->\n"))["sha256"]
    except (ValueError, KeyError, TypeError):
        return {}
    valid = isinstance(digests, dict) and digests.get(MANIFEST_HOLDER) == _digest(data[:cut])
    return {**digests, MANIFEST_HOLDER: _digest(data)} if valid else {}


def _legacy(directory: Path, page: bytes) -> dict[str, str]:
    """Digests of a pre-manifest report as it stands (reports/coin in the repository)."""
    path = directory / "report.json"
    if path.is_symlink() or not path.is_file() or not page.startswith(LEGACY_HEAD):
        return {}
    data = path.read_bytes()
    try:
        saved = json.loads(data)
    except ValueError:
        return {}
    looks_like_report = isinstance(saved, dict) and set(saved) >= LEGACY_KEYS
    if b"<title>ppl_em report: " not in page[:1000] or not looks_like_report:
        return {}
    return {MANIFEST_HOLDER: _digest(page), "report.json": _digest(data)}


def foreign_paths(directory: Path) -> list[str]:
    """Every path under ``directory`` the report did not write, with the reason."""
    digests, found = _manifest(directory), []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_symlink():
            found.append(f"{entry.path} (a symbolic link; reports hold none)")
        elif entry.is_dir(follow_symlinks=False):
            # Named down to the files inside; the directory itself if it cannot be read.
            inside = _leaves(entry.path) or [entry.path]
            found += [f"{p} (inside a directory; reports hold none)" for p in inside]
        elif not entry.is_file(follow_symlinks=False):
            found.append(f"{entry.path} (not a regular file)")
        elif entry.name not in digests or digests[entry.name] != _digest(_read(entry.path)):
            found.append(f"{entry.path} (not written by ppl_em, or changed since)")
    return found


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _leaves(top: str) -> list[str]:
    """Files, links and empty directories under ``top``, recursively, links not followed."""
    leaves = []
    for here, dirs, files in os.walk(top):
        leaves += [os.path.join(here, n) for n in files]
        leaves += [os.path.join(here, n) for n in dirs if os.path.islink(os.path.join(here, n))]
        if not dirs and not files:
            leaves.append(here)
    return leaves


def _leftover_pattern(name: str) -> re.Pattern:
    # New names carry the writer's PID; the previous writer's .NAME.tmp-XXXXXXXX did not.
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(?:(\d+)(?:-\w+)?|\w+)")


def _abandoned(pid: str | None) -> bool:
    """Whether the process that named a leftover is gone (no PID: an older ppl_em)."""
    if pid is None:
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no PID is that large
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def _only_report_files(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    return all(
        e.name in REPORT_FILES and e.is_file(follow_symlinks=False) for e in os.scandir(path)
    )


def clean_leftovers(target: Path) -> None:
    """Remove ``target``'s leftovers of interrupted runs; put back an old report left aside."""
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return  # no parent yet, or unreadable: nothing of ours there to clean
    pattern = _leftover_pattern(target.name)
    for name in names:
        found, path = pattern.fullmatch(name), target.parent / name
        if not found or not _abandoned(found[2]) or not _only_report_files(path):
            continue
        if found[1] == "old" and not os.path.lexists(target):
            path.rename(target)  # a kill came between the two renames
        else:
            shutil.rmtree(path)


def _resolve(out_dir: Path) -> Path:
    """The directory to write: a symlink's target, so that the link keeps pointing at it."""
    if not out_dir.is_symlink():
        return out_dir
    real = Path(os.path.realpath(out_dir))
    if real.is_symlink():
        raise FileExistsError(f"{out_dir} is a symbolic link loop; point it at a directory.")
    return real


def check_target(out_dir: str | os.PathLike, force: bool) -> Path:
    """Refuse an ``out_dir`` a report cannot be written to; return the directory to write.

    Cleans the target's own leftovers first. Raises FileExistsError for an existing
    target without ``force`` or one holding anything the report did not write, and
    NotADirectoryError/PermissionError/OSError for a location nothing can be created in.
    """
    out_dir = Path(out_dir).absolute()
    real = _resolve(out_dir)
    clean_leftovers(real)
    shown = str(out_dir) if real == out_dir else f"{out_dir} (a symbolic link to {real})"
    if os.path.lexists(real) and not real.is_dir():
        raise FileExistsError(f"{shown} exists and is a file, not a report directory.")
    if real.is_dir() and not force:
        raise FileExistsError(
            f"{shown} already exists; pass force=True (CLI: --force) to replace it, "
            "or choose another output directory."
        )
    foreign = foreign_paths(real) if real.is_dir() else []
    if foreign:
        raise FileExistsError(
            f"{shown} holds {len(foreign)} path(s) ppl_em did not write: "
            f"{'; '.join(foreign[:5])}; refusing to delete them even with --force. "
            f"Move them out of {real} or choose another output directory."
        )
    _check_writable(real, out_dir)
    return real


def _check_writable(real: Path, out_dir: Path) -> None:
    ancestor = real.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"cannot create {out_dir}: {ancestor} is not a directory; "
            "choose an output directory whose parents are directories."
        )
    try:  # unnamed where the OS allows (O_TMPFILE): a kill here leaves nothing behind
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise type(err)(
            f"cannot create {out_dir}: nothing can be created in {ancestor} ({err.strerror}); "
            f"choose a writable location or make {ancestor} writable."
        ) from err
    if real.is_dir() and not os.access(real, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot replace {out_dir}: the old report's files cannot be deleted from {real}; "
            f"make {real} writable or choose another output directory."
        )


def _step(name: str) -> None:
    # The test seam of the module docstring: stop here for a test to SIGKILL this process.
    if os.environ.get(STOP_AT_ENV) == name:
        print(
            f"ppl_em: stopped at report step {name!r} ({STOP_AT_ENV}); "
            f"kill -CONT {os.getpid()} resumes",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGSTOP)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the kernel or file system cannot."""
    call = _renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, real: Path) -> Path | None:
    """Move ``tmp`` to ``real``; return where the replaced report now is (None: none)."""
    if not real.is_dir():
        tmp.rename(real)
        return None
    if _exchange(tmp, real):
        _step("swapped")
        return tmp
    old = real.with_name(f".{real.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    real.rename(old)
    _step("old-moved")
    try:
        tmp.rename(real)
    except BaseException:
        old.rename(real)  # put the previous report back
        raise
    _step("swapped")
    return old


def _fill(tmp: Path, raw: dict[str, bytes]) -> None:
    for i, (name, data) in enumerate(raw.items()):
        with (tmp / name).open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the swap must never publish files still in the cache only
        if i == 0:
            _step("tmp-partial")
    tmp.chmod(0o755)  # mkdtemp creates mode 0700; a report is an ordinary, shareable directory


def replace_dir(out_dir: str | os.PathLike, files: dict[str, str], force: bool) -> Path:
    """Write ``files`` (name -> text) as the directory ``out_dir``, atomically; return it."""
    out_dir = Path(out_dir).absolute()
    real = check_target(out_dir, force)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent))
    try:
        _fill(tmp, with_manifest(files))
        _step("tmp-complete")
        old = _swap_in(tmp, real)
    except BaseException:
        if _only_report_files(tmp):  # unpublished files, or an old report nobody added to
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _discard(old)
    return out_dir


def _discard(old: Path) -> None:
    # Checked again: a file added to the old report since check_target is never deleted.
    foreign = foreign_paths(old)
    if foreign:
        raise FileExistsError(
            f"the new report is in place, but the old one gained {'; '.join(foreign[:5])} "
            f"while being replaced; it is kept in {old}: move what you need, then delete it."
        )
    shutil.rmtree(old)
