"""python -m scripts.export head_path=HEAD (repo_id=owner/name [private=true] | local_dir=FOLDER) [results=JSON]

Publishes a head with a generated model card (base model and revision, exit layer, head type, training
settings, held-out acceptance, and, given `results=`, the measured speedup and the hardware it was
measured on). `local_dir=` writes the same folder locally instead of uploading. The last stdout line is
one JSON object: where the head went and what the card says it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

from heads.cli import entry_point
from heads.errors import UserError
from heads.files import read_text
from heads.schema import ExportConfig


def read_results(path: str | None, config: dict) -> dict | None:
    from heads.hub import measured_from_results

    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"results file '{path}' does not exist: pass a sweep results.json or a saved decode JSON")
    text = read_text(file).strip()
    try:  # a whole JSON document, or a decode log whose last line is the result
        results = json.loads(text)
    except json.JSONDecodeError:
        try:
            results = json.loads(text.splitlines()[-1]) if text else None
        except json.JSONDecodeError:
            results = None
    if not isinstance(results, dict):
        raise UserError(f"results file '{path}' is not a JSON object (nor ends with one)")
    return measured_from_results(results, config)


def export(cfg: DictConfig) -> dict:
    # torch and the Hub client load here: a refused command line (one line) comes before them
    from heads.head import read_head_config
    from heads.hub import push_head, write_head_folder

    if not cfg.head_path:
        raise UserError("no head given: pass head_path=<head folder>")
    if bool(cfg.repo_id) == bool(cfg.local_dir):
        raise UserError("pass exactly one of repo_id=owner/name (upload to the Hub) or local_dir=<folder> (write locally)")
    config = read_head_config(cfg.head_path)
    # A head exported before (e.g. a sweep's selected_head) already carries its measurement.
    measured = read_results(cfg.results, config) or (config.get("metadata") or {}).get("measured")
    where = {"head_type": config["head_type"], "exit_layer": config["exit_layer"], "base_model": config["base_model"],
             "measured_speedup": (measured or {}).get("speedup_vs_ar"), "hardware": (measured or {}).get("hardware")}
    if cfg.local_dir:
        folder = write_head_folder(cfg.head_path, cfg.local_dir, measured=measured, overwrite=cfg.overwrite)
        return {"local_dir": str(folder)} | where
    if cfg.token:  # it works, but other users see it in `ps` and it stays in the shell's history
        print("warning: token= on the command line is visible to other processes and kept in shell history: "
              "prefer HF_TOKEN or `hf auth login`", file=sys.stderr, flush=True)
    url = push_head(cfg.head_path, cfg.repo_id, private=cfg.private, token=cfg.token or None, measured=measured)
    return {"repo_id": cfg.repo_id, "url": url, "private": bool(cfg.private)} | where


@entry_point("export", ExportConfig, one_line_errors=True)
def main(cfg: DictConfig) -> None:
    print(json.dumps(export(cfg)), flush=True)


if __name__ == "__main__":
    main()
