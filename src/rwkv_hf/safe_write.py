"""Writing outputs without ever losing what the user owns: the rules every rwkv-hf writer follows.

- An output is built in a temporary sibling (`.NAME.partial-HOST-PID-*`) and moved into place with
  one rename at the very end. The final rename never replaces anything that appeared meanwhile (a
  second run to the same OUT_DIR): that run fails with nothing deleted, the first one's output stays.
- A folder rwkv-hf wrote is recognised by its manifest, `rwkv_hf_manifest.json`, which lists every
  file the writer put there. `--force` replaces an existing folder only when it is empty or when every
  entry in it is listed in its manifest; a folder holding anything else is refused, naming the
  entries. It never replaces (or writes into) the current folder, a folder holding a source file, or
  a parent of either.
- Temporary siblings left by a killed run are removed by the next run to the same OUT_DIR once their
  owner process (same host) is gone; ones it cannot attribute are reported.
- What is created honours the umask (a plain `mkdir` / `open` would; `mkdtemp`/`mkstemp` would not).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from .version import __version__

MANIFEST = "rwkv_hf_manifest.json"


class UnsafeOutput(FileExistsError):
    """An output location rwkv-hf refuses to write, or to replace; the message says why."""


# ------------------------------------------------------------------------------------------ umask
def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: os.PathLike, folder: bool) -> None:
    """Give `path` the mode a plain mkdir (0o777) or open (0o666) would have given it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


# ---------------------------------------------------------------------------- whose folder is it
def _entries(folder: Path) -> List[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [str(rel / d) + "/" for d in dirs] + [str(rel / f) for f in files]
    return sorted(e[2:] if e.startswith("./") else e for e in out)


def written_files(folder: Path) -> Optional[List[str]]:
    """The files the manifest in `folder` says rwkv-hf wrote there, or None without a readable one."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("written_by") != "rwkv-hf" or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def foreign_entries(folder: Path) -> List[str]:
    """Entries of `folder` that rwkv-hf did not write (everything, if it has no manifest)."""
    ours = set(written_files(folder) or ()) | {MANIFEST}
    return [e for e in _entries(Path(folder)) if e not in ours]


def write_manifest(folder: Path) -> None:
    files = [e for e in _entries(folder) if e != MANIFEST]
    data = {"written_by": "rwkv-hf", "version": __version__, "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def guard_output(out: os.PathLike, force: bool, protect: Iterable[Tuple[str, os.PathLike]] = (), folder: bool = True):
    """Refuse an output that would replace the user's files. Returns the (dev, inode) of an existing
    output that may be replaced (None when there is nothing to replace).

    `protect`: (what, path) pairs the output must neither be nor hold (the sources); the current
    folder is always protected."""
    out = Path(out)
    real = out.resolve()
    for what, path in [("the current folder", Path.cwd()), *protect]:
        path = Path(path).resolve()
        if _inside(path, real):
            detail = "" if path == real else f" ({path} is inside it)"
            raise UnsafeOutput(f"{out} is or holds {what}{detail}; write to a new folder")
    if not out.exists() and not out.is_symlink():
        return None
    if folder:
        if not out.is_dir():
            raise UnsafeOutput(f"{out} exists and is not a folder")
        if not any(out.iterdir()):
            return None
        if not force:
            raise UnsafeOutput(f"{out} exists and is not empty (use --force to replace a folder rwkv-hf wrote)")
        foreign = foreign_entries(out)
        if foreign:
            why = "has no " + MANIFEST if written_files(out) is None else f"holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} its {MANIFEST} does not list"
            raise UnsafeOutput(
                f"--force replaces only a folder rwkv-hf wrote, and {out} {why} "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); move those away or pick another folder"
            )
    else:
        if out.is_dir() or not out.is_file():
            raise UnsafeOutput(f"{out} exists and is not a plain file")
        if not force:
            raise UnsafeOutput(f"{out} exists (use --force to replace it)")
    st = out.stat()
    return (st.st_dev, st.st_ino)


# -------------------------------------------------------------------------------- the final move
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (atomically on Linux)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # a file system without RENAME_NOREPLACE: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _appeared(out: Path) -> UnsafeOutput:
    return UnsafeOutput(f"{out} appeared or changed while this run was writing it (another run?); it was left as it is and this output discarded")


def _tag() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def _move_into_place(tmp: Path, out: Path, replace, folder: bool) -> None:
    if replace is None:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            if not (folder and out.is_dir() and not any(out.iterdir())):
                raise _appeared(out) from None
            os.rename(tmp, out)  # an empty folder (there from the start) may be replaced; a non-empty one fails
        return
    try:
        st = out.stat()
        same = (st.st_dev, st.st_ino) == replace and (not folder or not foreign_entries(out))
    except OSError:
        same = False
    if not same:
        raise _appeared(out)
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_tag()}", dir=out.parent))
    os.rename(out, trash / "old")
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(trash / "old", out)
        shutil.rmtree(trash, ignore_errors=True)
        raise _appeared(out) from None
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ stale leftovers
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<host>[^-]+)-(?P<pid>\d+)-)?[^/]*$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: os.PathLike, log: Callable[[str], None]) -> None:
    """Remove the temporary siblings of `out` that killed runs left behind; report those of unknown owner."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    host = socket.gethostname().replace("-", "_")
    for p in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != out.name:
            continue
        if m["pid"] is None or m["host"] != host:
            log(f"note: {p} looks like the leftover of an interrupted run; delete it if no other run is writing {out}")
            continue
        if _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and (p / "old").is_dir() and not os.path.lexists(out):
            os.rename(p / "old", out)  # killed between moving the old output away and the new one in
            log(f"note: put back {out}, which an interrupted run had moved aside")
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        log(f"note: removed {p}, left by an interrupted run")


# ----------------------------------------------------------------------------------- the writers
@contextlib.contextmanager
def atomic_folder(out_dir: os.PathLike, force: bool = False, protect=(), log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `out_dir` (with a manifest) if the block finishes.

    Refused before anything is written: see `guard_output`. An exception, Ctrl-C or SIGTERM (the CLI
    turns it into KeyboardInterrupt) inside the block removes the temporary folder and leaves
    `out_dir` as it was; so does `out_dir` appearing or changing meanwhile (then UnsafeOutput).
    """
    out = Path(out_dir)
    clean_leftovers(out, log)  # first: it may put back an output a killed run had moved aside
    replace = guard_output(out, force, protect, folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_tag()}", dir=out.parent))
    try:
        yield tmp
        write_manifest(tmp)
        for root, dirs, files in os.walk(tmp):  # some writers (safetensors) create their files 0600
            for name in files:
                honour_umask(Path(root) / name, folder=False)
            for name in dirs:
                honour_umask(Path(root) / name, folder=True)
        honour_umask(tmp, folder=True)
        _move_into_place(tmp, out, replace, folder=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out_path: os.PathLike, force: bool = False, protect=(), log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield a temporary path that becomes `out_path` if the block finishes; the same rules as `atomic_folder`."""
    out = Path(out_path)
    clean_leftovers(out, log)  # first: it may put back an output a killed run had moved aside
    replace = guard_output(out, force, protect, folder=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-{_tag()}", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        honour_umask(tmp, folder=False)
        _move_into_place(tmp, out, replace, folder=False)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["MANIFEST", "UnsafeOutput", "atomic_file", "atomic_folder", "foreign_entries", "guard_output", "written_files"]
