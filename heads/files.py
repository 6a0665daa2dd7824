"""Files every command writes or reads the same way: atomic writes, the run folder a command owns, the checks
that make a missing resource one line, and the prompts JSONL.

A killed process leaves either the old file (or folder) or the new one, never half of one: everything is
written under a temporary name beside its target and renamed into place, which POSIX makes atomic. A write
that fails (a full disk, Ctrl-C) removes its temporary file, so the previous run's files stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from heads.errors import UserError

LOCK_FILE = ".ppsd-run.lock"  # inside a run's out_dir; the lock on it, not the file, is what counts
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------- full disks, unwritable folders, bad bytes


def is_disk_full(e: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EDQUOT, or the same seen through a library that
    reports it in words (torch's zip writer: "unexpected pos", "file write failed"; safetensors: "os error 28")."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)
    return any(words in text for words in ("No space left on device", "Disk quota exceeded", "os error 28",
                                           "unexpected pos", "file write failed"))


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None


def disk_full_error(path: Path | str, doing: str, fix: str = "free some space, or write to another disk") -> UserError:
    """The one line for a write that ran out of space (the caller has removed what it half wrote)."""
    free = _free(Path(path))
    return UserError(f"no space left on the device of {path} while {doing} ({_size(free) if free is not None else '?'} "
                     f"free; what was half written is removed): {fix}")


def writable_folder(folder: Path | str, *, what: str, fix: str, need_bytes: int = 0) -> Path:
    """`folder` made if missing and proved writable, with at least `need_bytes` free; else one line naming
    `what` (e.g. "out_dir=runs/x") and `fix` (what to set). Runs before any model loads."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{what} is not a writable folder ({e.strerror or type(e).__name__}"
                        f"{': ' + str(e.filename) if e.filename and str(e.filename) != str(path) else ''}): {fix}") from None
    free = _free(path)
    if free is not None and free < need_bytes:
        raise UserError(f"{what} has {_size(free)} free and this run needs about {_size(need_bytes)}: "
                        f"free some space, or {fix}")
    return path


def writable_cache(folder: Path | str, *, need_bytes: int = 0, option: str | None = None) -> Path:
    """A folder under ppsd's cache (PPSD_CACHE, else ~/.cache/ppsd), checked as `writable_folder` does, its
    message naming the variable to set (and `option`, a command's own key for the folder, if it has one)."""
    instead = f" (or pass {option}=<a folder>)" if option else ""
    if os.environ.get("PPSD_CACHE"):
        what, fix = f"PPSD_CACHE={os.environ['PPSD_CACHE']}", f"set PPSD_CACHE to a writable folder with room{instead}"
    else:
        what = f"the cache {folder} (PPSD_CACHE is unset: it lies under HOME={os.environ.get('HOME', '?')})"
        fix = f"set PPSD_CACHE=<a writable folder>{instead}"
    return writable_folder(folder, what=what, fix=fix, need_bytes=need_bytes)


def read_text(path: Path | str, fix: str = "save it as UTF-8") -> str:
    """A text file that must be UTF-8: anything else is one line naming the file and the first bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}): "
                        f"{fix}") from None


# ---------------------------------------------------------------- atomic writes


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, f"writing {path.name}") from None
        raise


def atomic_write_json(path: Path | str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path | str, *, overwrite: bool = True):
    """Yield a temporary folder beside `target`; when the block ends without error, it becomes `target`.

    overwrite=False is for caches keyed by content: when another process has written `target` first,
    its copy stands and ours is dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if overwrite and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if overwrite or not target.exists():
                raise
    except BaseException as e:
        if is_disk_full(e):
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(target, f"writing {target.name}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StagedFiles:
    """Files written under temporary names in one folder (streamed as a run produces them) and renamed into
    place together by `commit`; `discard` removes them. See `staged_files`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, tuple[Path, object]] = {}

    def open(self, name: str):
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        handle = open(tmp, "w", encoding="utf-8")
        self.files[name] = (tmp, handle)
        return handle

    def write_text(self, name: str, text: str) -> None:
        self.open(name).write(text)

    def commit(self) -> None:
        for _, handle in self.files.values():  # every byte on disk before any file replaces its old version
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for name, (tmp, _) in self.files.items():
            os.replace(tmp, self.folder / name)

    def discard(self) -> None:
        for tmp, handle in self.files.values():
            with contextlib.suppress(OSError):
                handle.close()
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_files(folder: Path | str, doing: str = "writing the run's files"):
    """A run's output files, all-or-nothing: written beside their targets, renamed into place when the block
    ends without error. On any failure the temporary files are removed, so the previous run's files stay as
    they were; a full disk is one line."""
    staged = StagedFiles(Path(folder))
    try:
        yield staged
        staged.commit()
    except BaseException as e:
        staged.discard()
        if is_disk_full(e):
            raise disk_full_error(folder, doing) from None
        raise


# ---------------------------------------------------------------- the folder a run owns


@contextlib.contextmanager
def run_folder(folder: Path | str, command: str, *, key: str = "out_dir", need_bytes: int = 0):
    """Hold `folder` for one run: made if missing, checked writable (with `need_bytes` free) and locked, so a
    second run into it refuses with one line instead of writing into the same files. The lock is an flock
    the kernel drops when the process ends, however it ends: a killed run never leaves a stale lock."""
    import fcntl

    fix = f"pass {key}=<a folder you can write>"
    path = writable_folder(folder, what=f"{key}={folder}", fix=fix, need_bytes=need_bytes)
    lock = open(path / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()[:100] or "another process"
        lock.close()
        raise UserError(f"{key}={folder} is in use by another run ({holder}): wait for it to end, "
                        f"or pass another {key}=") from None
    try:
        lock.truncate(0)
        lock.write(f"{command}, pid {os.getpid()}\n")
        lock.flush()
        yield path
    finally:
        lock.close()  # closing the last descriptor releases the lock


# ---------------------------------------------------------------- prompts


def prompt_turns(row, where: str) -> list[str]:
    """A prompt row's `turns` (one string, or a list of them) as a list; a one-line error naming `where` else."""
    turns = row.get("turns") if isinstance(row, dict) else None
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise UserError(f"{where} needs 'turns': a non-empty list of non-empty strings (Spec-Bench format)")
    return turns


def read_prompts(path: Path | str, limit: int | None = None) -> list[dict]:
    """A Spec-Bench-format JSONL -> [{question_id, category, turns}], with a one-line error naming the
    file and line for anything else. `turns` may be one string; `id` is accepted for `question_id`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist: pass a Spec-Bench-format JSONL "
                        f"(one {{\"question_id\", \"category\", \"turns\": [...]}} object per line)")
    questions = []
    for number, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not valid JSON ({e.msg}): one object per line") from None
        turns = prompt_turns(row, f"{path}:{number}")
        questions.append({"question_id": row.get("question_id", row.get("id", number)),
                          "category": row.get("category", "default"), "turns": turns})
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise UserError(f"prompts file '{path}' holds no questions: there are no prompts to read; "
                        f"add lines like {{\"turns\": [\"...\"]}}")
    return questions
