"""The sweep's plan and its folder: the candidates (exit layer x head x stages [x γ]) checked against the
base, and the folder's sweep.json, which pins the base model and the measurement settings so that a folder
is never mixed."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from heads.errors import UserError
from heads.files import atomic_write_json
from heads.schema import HEAD_TYPES


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    head: str
    exit_layer: int
    stages: int
    gamma: int | None = None

    @property
    def key(self) -> str:
        return f"L{self.exit_layer:02d}-{self.head}-s{self.stages}" + (f"-g{self.gamma}" if self.gamma else "")


def _int_list(value, name: str) -> list[int]:
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    try:
        return sorted({int(v) for v in values if v is not None})
    except (TypeError, ValueError):
        raise UserError(f"{name}={values} must be a list of integers, e.g. {name}=[8,12,16]") from None


def base_info(model: str) -> tuple[str, int]:
    """(hub id of the base, number of decoder layers) from its config alone: no weights are loaded."""
    from heads.base import model_num_layers, model_source_id, resolve_model_path

    return model_source_id(resolve_model_path(model), model), model_num_layers(model)


def model_slug(model: str) -> str:
    """A folder name for a model: "smollm2", "Qwen--Qwen2.5-0.5B", or a local folder's name."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model.replace("/", "--")


def plan(cfg: DictConfig, num_layers: int) -> list[Candidate]:
    """Validate the candidates (one-line errors) and list them in evaluation order."""
    layers = _int_list(cfg.exit_layers, "exit_layers")
    if not layers:
        raise UserError("no candidate exit layers: pass exit_layers=[8,12,16] (layers in 1..N-1 of the base)")
    heads = list(dict.fromkeys(cfg.heads or []))
    if not heads:
        raise UserError("no head types: pass heads=[mlp] (or [mlp,transformer])")
    for head in heads:
        if head not in HEAD_TYPES:
            raise UserError(f"unknown head type '{head}' in heads: use {', '.join(HEAD_TYPES)}")
    stages = _int_list(cfg.stages, "stages")
    if not stages or min(stages) < 2:
        raise UserError(f"stages={stages}: PPSD needs at least 2 stages, e.g. stages=[2]")
    top = num_layers - (max(stages) - 1)
    bad = [e for e in layers if not 1 <= e <= top]
    if bad:
        raise UserError(f"exit layer(s) {bad} out of range: this {num_layers}-layer base with up to {max(stages)} "
                        f"stages takes exit layers 1..{top}")
    gammas = _int_list(cfg.gammas, "gammas") or [None]
    if any(g is not None and g < 1 for g in gammas):
        raise UserError(f"gammas={gammas}: EESD draft lengths are >= 1")
    if cfg.limit is not None and int(cfg.limit) < 1:
        raise UserError(f"limit={cfg.limit}: measure at least one prompt")
    return [Candidate(h, e, s, g) for h, e, s, g in itertools.product(heads, layers, stages, gammas)]


def describe_hardware() -> str:
    """What the measurement ran on, for the report and the model card."""
    import torch

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"{torch.cuda.device_count()}x {'/'.join(sorted(names))} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def manifest_for(cfg: DictConfig, base_model: str, num_layers: int) -> dict:
    prompts = Path(cfg.prompts).expanduser().resolve()
    return {
        "base_model": base_model,
        "model": str(cfg.model),
        "num_layers": num_layers,
        "prompts": str(prompts),
        "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()[:16],
        "limit": cfg.limit,
        "max_new_tokens": cfg.max_new_tokens,
        "train_overrides": list(cfg.train_overrides),
        "decode_overrides": list(cfg.decode_overrides),
    }


# What must match for measurements in one folder to be comparable.
PINNED = ("base_model", "num_layers", "prompts_sha256", "limit", "max_new_tokens", "decode_overrides")


def open_sweep_folder(out: Path, manifest: dict) -> dict:
    """Create or reopen a sweep folder; refuse one made for another base model or other measurement settings."""
    path = out / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("base_model") != manifest["base_model"]:
            raise UserError(f"sweep folder '{out}' was made for base model {old.get('base_model')}, not "
                            f"{manifest['base_model']}: pass a new out_dir=")
        changed = [k for k in PINNED if old.get(k) != manifest.get(k)]
        if changed:
            raise UserError(f"sweep folder '{out}' was measured with other settings ({', '.join(changed)}): rerun "
                            f"with the same settings to resume, or pass a new out_dir=")
        manifest = old | {k: v for k, v in manifest.items() if k not in PINNED}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)
    return manifest


# --- the folder's files --------------------------------------------------------------------------------------

def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
