"""Checkpoints: what they hold, how they are written (atomically, the latest one kept), and the guards a
resume passes before DeepSpeed reads one.

A checkpoint folder `checkpoints/step_NNNNNNN` holds DeepSpeed's state (weights, optimizer, scheduler, the step),
the heads as safetensors and the run's identity; `checkpoints/latest` names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from heads import UserError
from heads.files import (atomic_write_text, disk_full_error, is_disk_full, read_text, writable_cache,
                         writable_folder)
from train.distributed import barrier

RUN_FILE = "run.json"          # the configuration a checkpoint belongs to
HEADS_FILE = "heads.safetensors"  # the heads' weights, readable without pickle
_STEP_DIR = re.compile(r"^step_\d{7}$")


def run_identity(cfg, exit_layers: list[int], base_model: str) -> dict:
    """What a checkpoint must share with the run that resumes it (anything else may change between them)."""
    return {"exit_layers": list(exit_layers), "head_type": str(cfg.head.type), "mlp_hidden": int(cfg.head.mlp_hidden),
            "base_model": base_model} | ({"mlp_layers": int(cfg.head.mlp_layers)} if cfg.head.mlp_layers != 1 else {})


def checkpoint_bytes(cfg, exit_layers: list[int]) -> int:
    """About the most a run keeps in out_dir at once: two checkpoints side by side (a new one is complete before
    the old one goes), each holding the heads' fp32 weights five times over (DeepSpeed's weights, its optimizer's
    master copy and two moments, the safetensors copy). 0 when the heads cannot be sized from the config alone."""
    from transformers import AutoConfig

    from heads.base import resolve_model_path
    from heads.head import ExitHead

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            heads = [ExitHead(str(cfg.head.type), e, str(cfg.model), config.to_diff_dict() | {"model_type": config.model_type},
                              mlp_hidden=int(cfg.head.mlp_hidden), mlp_layers=int(cfg.head.mlp_layers))
                     for e in exit_layers]
    except Exception:  # noqa: BLE001: an architecture ExitHead cannot size here; the run itself will say more
        return 0
    return 2 * 5 * 4 * sum(p.numel() for head in heads for p in head.parameters())


def check_run_folders(cfg, exit_layers: list[int]) -> Path:
    """Every folder a run writes, checked before any model loads (one line naming what to set): out_dir (made,
    writable, with room for `checkpoint_bytes`), the data cache, and DeepSpeed's build folder for its ops."""
    from torch.utils.cpp_extension import get_default_build_root

    from heads.base import cache_root

    out_dir = writable_folder(cfg.out_dir, what=f"out_dir={cfg.out_dir}", fix="pass out_dir=<a folder you can write>",
                              need_bytes=checkpoint_bytes(cfg, exit_layers))
    if cfg.data.cache_dir:
        writable_folder(cfg.data.cache_dir, what=f"data.cache_dir={cfg.data.cache_dir}",
                        fix="pass data.cache_dir=<a folder you can write>")
    else:
        writable_cache(cache_root() / "data", option="data.cache_dir")
    build = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    writable_folder(build, what=f"DeepSpeed's build folder {build}" + ("" if os.environ.get("TORCH_EXTENSIONS_DIR")
                                                                        else f" (under HOME={os.environ.get('HOME', '?')})"),
                    fix="set TORCH_EXTENSIONS_DIR=<a writable folder>")
    return out_dir


def save_checkpoint(engine, ckpt_root: Path, step: int, rank: int, identity: dict) -> None:
    """DeepSpeed state (weights, optimizer, scheduler), the heads as safetensors and the run's identity into a
    temp folder, renamed into place when complete."""
    from safetensors.torch import save_file

    tmp = ckpt_root / f".tmp-step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(str(tmp), tag="state", client_state={"step": step}, save_latest=False)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # every rank: it is a collective
            heads = {k: v.detach().cpu().contiguous().clone() for k, v in engine.module.state_dict().items()}
        barrier()
        if rank == 0:
            save_file(heads, tmp / HEADS_FILE)
            (tmp / RUN_FILE).write_text(json.dumps(identity))
    except BaseException as e:  # a full disk, Ctrl-C, SIGTERM: no half checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            kept = latest_name(ckpt_root)
            fix = (f"checkpoints/{kept} is kept: free some space, then rerun with resume=true" if kept
                   else "free some space, or pass out_dir= on another disk")
            raise disk_full_error(tmp, f"writing the checkpoint of step {step}", fix) from None
        raise
    if rank == 0:
        final = ckpt_root / f"step_{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / "latest", final.name)
        for old in ckpt_root.glob("step_*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_name(ckpt_root: Path) -> str | None:
    """The checkpoint folder `latest` names, if it is a well-formed name of one that exists."""
    try:
        name = (ckpt_root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.match(name) and (ckpt_root / name).is_dir() else None


def metrics_lines_upto(path: Path, step: int) -> None:
    """After a resume, drop the log lines of steps the checkpoint does not contain (they will be redone)."""
    if path.exists():
        keep = [l for l in read_text(path).splitlines() if _step_of(l) is not None and _step_of(l) <= step]
        atomic_write_text(path, "".join(l + "\n" for l in keep))


def _step_of(line: str) -> int | None:
    """A log line's step; None for a line cut short (by a kill or a full disk) or not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


# ---------------------------------------------------------------- resume guards


def resume_folder(out_dir: Path, identity: dict) -> Path:
    """The checkpoint `checkpoints/latest` names, checked to be this run's and inside its folder."""
    root = out_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        raise UserError(f"resume=true but {root} holds no checkpoint: pass out_dir=<the folder of the run to resume>")
    name = read_text(latest, fix="the file was damaged; write the name of a folder under checkpoints/ into it, "
                               "or start a new out_dir").strip()
    if not _STEP_DIR.match(name):  # never follow an absolute path or `..` out of the run's folder
        raise UserError(f"{latest} names '{name[:80]}', not a checkpoint folder (step_NNNNNNN): the file was edited or "
                        "damaged; write the name of a folder under checkpoints/ into it, or start a new out_dir")
    folder = root / name
    if not (folder / "state").is_dir():
        raise UserError(f"{latest} names {name}, which is missing or incomplete: write the name of an existing "
                        "checkpoint folder into it, or start a new out_dir")
    saved_file = folder / RUN_FILE
    if saved_file.is_file():
        try:
            saved = json.loads(read_text(saved_file))
        except (OSError, json.JSONDecodeError, UserError):
            raise UserError(f"{saved_file} is not readable JSON: the checkpoint is damaged; start a new out_dir") from None
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in identity.items() if saved.get(k) != v]
        if changed:
            raise UserError(f"resume=true but the checkpoint in {out_dir} belongs to another configuration "
                            f"({'; '.join(changed)}): resume with its settings, or pass a new out_dir")
    else:
        print(f"warning: {folder} records no configuration (written by an older ppsd): resuming unchecked", flush=True)
    check_checkpoint_pickles(folder)
    return folder


def _deepspeed_safe_globals() -> list:
    """The classes a DeepSpeed checkpoint of these heads pickles besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_pickles(folder: Path) -> None:
    """DeepSpeed loads its files with an unrestricted torch.load; first prove each unpickles with nothing but
    tensors, plain containers and DeepSpeed's own state classes (torch's weights_only unpickler), so a
    planted object that would run code on load is refused instead."""
    for file in sorted((folder / "state").glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001: any failure means "do not hand this to a full unpickler"
            why = next((l.strip() for l in str(e).splitlines() if "Unsupported global" in l), type(e).__name__)
            raise UserError(f"{file} holds more than checkpoint state ({why[:160]}): it was not written by this "
                            "trainer or is damaged; resume only checkpoints you wrote, or start a new out_dir") from None


def check_heads_match(engine, folder: Path) -> None:
    """After DeepSpeed's load: the heads' weights must equal the safetensors copy saved beside them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / HEADS_FILE
    if not file.is_file():
        return  # an older checkpoint: DeepSpeed's own files are all there is
    try:
        saved = load_file(file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} cannot be read ({str(e).splitlines()[0]}): the checkpoint is damaged; "
                        "start a new out_dir") from None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = engine.module.state_dict()
        bad = sorted(k for k in state.keys() | saved.keys()
                     if k not in saved or k not in state or not torch.equal(saved[k].to(state[k]), state[k]))
    if bad:
        raise UserError(f"the checkpoint in {folder} holds heads that differ from its {HEADS_FILE} ({bad[0]}): "
                        "it is damaged or was altered; start a new out_dir")
