"""Files every command writes or reads the same way: atomic writes and the prompts JSONL.

A killed process leaves either the old file (or folder) or the new one, never half of one: everything is
written under a temporary name beside its target and renamed into place, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from heads.errors import UserError


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_prompts(path: Path | str, limit: int | None = None) -> list[dict]:
    """A Spec-Bench-format JSONL -> [{question_id, category, turns}], with a one-line error naming the
    file and line for anything else. `turns` may be one string; `id` is accepted for `question_id`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist: pass a Spec-Bench-format JSONL "
                        f"(one {{\"question_id\", \"category\", \"turns\": [...]}} object per line)")
    questions = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not valid JSON ({e.msg}): one object per line") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{path}:{number} needs 'turns': a non-empty list of non-empty strings (Spec-Bench format)")
        questions.append({"question_id": row.get("question_id", row.get("id", number)),
                          "category": row.get("category", "default"), "turns": turns})
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise UserError(f"prompts file '{path}' holds no questions: there are no prompts to read; "
                        f"add lines like {{\"turns\": [\"...\"]}}")
    return questions
