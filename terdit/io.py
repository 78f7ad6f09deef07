"""Atomic file and directory writes, safe tensor I/O, output checks, locks and crash-leftover cleanup.

Nothing already written is ever half-replaced: every write goes to a temporary sibling named
``.<name>.<8 random chars>.tmp`` and is renamed into place when complete. A directory being replaced is
first moved aside to ``.<name>.old``; a command started after a crash restores or removes these
leftovers (``clean_leftovers``). Files get mode 0666 & ~umask and folders 0777 & ~umask, as if created
by ``open``/``mkdir``.

Fault injection (tests only): ``TERDIT_FAULT=<glob>:<n>[:<SIGNAL>]`` makes the n-th ``fault_point`` whose
site name matches the glob kill the process with ``os._exit(137)`` (as ``kill -9`` would) or, with a
signal name, send that signal to the process; ``TERDIT_FAULT_LOG=<file>`` appends every site reached.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from terdit.errors import TerditError

_fault_counts: dict[str, int] = {}
TMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")  # .<target>.<random>.tmp
OLD_RE = re.compile(r"^\.(?P<target>.+)\.old$")


def fault_point(site: str) -> None:
    """A named point where tests may inject a crash or a signal (see the module docstring)."""
    log = os.environ.get("TERDIT_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(site + "\n")
    spec = os.environ.get("TERDIT_FAULT")
    if not spec:
        return
    pattern, count = spec.rsplit(":", 1)  # site names contain colons: parse from the right
    action = ""
    if not count.isdigit():
        (pattern, count), action = pattern.rsplit(":", 1), count
    if not fnmatch.fnmatchcase(site, pattern):
        return
    _fault_counts[spec] = _fault_counts.get(spec, 0) + 1
    if _fault_counts[spec] != int(count):
        return
    if action:
        os.kill(os.getpid(), getattr(signal, "SIG" + action))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(137)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def follow_umask(directory: Path, since: float) -> None:
    """Give files written under `directory` since `since` (a time.time()) the usual mode 0666 & ~umask: files
    that other libraries write (safetensors >= 0.5 writes 0600, so diffusers' save_pretrained does too)."""
    mode = file_mode()
    for path in [directory, *directory.rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since - 1:
            path.chmod(mode)


def _tmp_sibling(path: Path, directory: bool) -> Path:
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if isinstance(made, tuple):
        os.close(made[0])
        made = made[1]
    return Path(made)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) and rename tmp_path over `path` only when it finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, directory=False)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
        fault_point(f"rename:{path.name}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling, then swap it into place.

    An existing directory is swapped out in one atomic exchange where the OS has one (Linux); elsewhere it
    takes two renames (old aside to `.NAME.old`, new in) and a crash between them leaves `.NAME.old`,
    which `clean_leftovers` puts back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, directory=True)
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp made it 0700
        fill(tmp)
        fault_point(f"fill:{path.name}")
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            fault_point(f"exchange:{path.name}")  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            fault_point(f"aside:{path.name}")
            os.replace(tmp, path)
            fault_point(f"rename:{path.name}")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fault_point(f"rename:{path.name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that a crash midway leaves a temporary name, never a half-deleted original."""
    path = Path(path)
    doomed = _tmp_sibling(path, directory=True)
    os.replace(path, doomed)  # replaces the empty directory mkdtemp made
    fault_point(f"remove:{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(folder: str | Path, names: Iterable[str] = ("*",), log: Callable[[str], None] | None = print
                    ) -> list[str]:
    """Remove the temporaries a killed terdit process left in `folder` for targets matching `names`
    (globs), and put back a directory a crash left moved aside. Returns what was done, and logs one line."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        tmp, old = TMP_RE.match(entry.name), OLD_RE.match(entry.name)
        m = tmp or old
        if not m or not any(fnmatch.fnmatchcase(m["target"], n) for n in names):
            continue
        target = folder / m["target"]
        if old and not target.exists() and entry.is_dir():
            os.replace(entry, target)  # the crash came between the two renames of a replacement
            done.append(f"restored {target.name}")
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"removed {entry.name}")
    if done and log is not None:
        log(f"{folder}: cleaned crash leftovers: {', '.join(done)}")
    return done


# -------------------------------------------------------------------------------------------- outputs


def _is_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: str | Path, *, inputs: Iterable[str | Path] = (), own: Callable[[Path], bool],
                 kind: str, overwrite: bool = False, arg: str = "--out", folder: bool = True) -> Path:
    """Refuse (TerditError) an output path that would destroy something: an input (or a folder holding
    one), anything that is not `kind` (per `own`), or `kind` itself without `overwrite`; and a location
    that cannot be written. An empty directory is free for a `folder` output."""
    out = Path(out)
    resolved = out.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if _is_inside(s, resolved):
            raise TerditError(f"{arg} {out}: is (or holds) the input {src}; choose another path")
    if out.exists() or out.is_symlink():
        if folder and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            pass
        elif not own(out):
            raise TerditError(f"{arg} {out}: exists and is not a {kind}; refusing to replace it")
        elif not overwrite:
            raise TerditError(f"{arg} {out}: a {kind} is already there; pass --overwrite to replace it")
    check_writable(out.parent, arg=f"{arg} {out}")
    return out


def check_writable(folder: str | Path, arg: str) -> None:
    """Fail early when `folder` cannot be created or written (before any work is done)."""
    p = Path(folder).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise TerditError(f"{arg}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise TerditError(f"{arg}: {p} is not writable")


# --------------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def locked(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `lock_file` for the block; it dies with the process, so
    a crash never leaves a stale lock. A second holder is refused at once, naming the first one's PID."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TerditError(f"{what} is in use by process {holder} (lock {lock_file}); "
                              "wait for it to finish or stop it") from None
        try:  # the file may have been unlinked by its previous holder between our open and flock
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        os.close(fd)


# ------------------------------------------------------------------------------------------ formats


def read_json(path: str | Path):
    """Parsed JSON, or a TerditError naming the file when it cannot be read or parsed."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TerditError(f"{path}: not readable JSON ({e})") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """safetensors, atomically; tensors are made contiguous and detached first."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing, truncated or foreign file into a TerditError."""
    path = Path(path)
    if not path.is_file():
        raise TerditError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise TerditError(f"{path}: not a valid safetensors file ({e})") from e


def load_torch_state(path: str | Path) -> dict:
    """torch.save'd plain data (weights_only: never unpickles code); a missing, truncated or foreign file
    is a TerditError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TerditError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise TerditError(f"{path}: not a readable torch state file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise TerditError(f"{path}: not a training state (a {type(state).__name__})")
    return state
