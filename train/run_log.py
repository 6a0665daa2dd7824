"""The run's log: metrics.jsonl (one JSON object per line, appended) and the W&B run beside it."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from heads.files import disk_full_error, is_disk_full


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a line cut short is dropped on resume (train/checkpoint.py: metrics_lines_upto)
        if is_disk_full(e):
            raise disk_full_error(path, f"appending to {path.name}", "free some space, then rerun with "
                                  "resume=true (it continues from the last checkpoint)") from None
        raise


def wandb_run(cfg, out_dir: Path, resolved: dict):
    """The W&B run (resumed by the id kept in out_dir), online only with an API key; None when disabled."""
    if not cfg.wandb.enabled:
        return None
    import wandb

    mode = cfg.wandb.mode or os.environ.get("WANDB_MODE")
    if not mode:
        netrc = Path.home() / ".netrc"
        has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        mode = "online" if has_key else "offline"
    if mode == "disabled":
        return None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name, mode=mode,
                      dir=str(out_dir), config=resolved, id=run_id, resume="allow")
