"""python -m scripts.sweep exit_layers=[8,12,16,20] heads=[mlp] stages=[2] prompts=FILE.jsonl [limit=8]

"Which exit layer, which head, how many stages?" answered by measurement on this hardware:

1. train: one `python -m train exit_layers=[...] head=H` job per head type (a multi-exit job shares the
   base's forward pass across layers);
2. evaluate: every candidate (exit layer x head x stages [x γ]) with `python -m decode method=ppsd
   compare=[ar,eesd]` on the same prompts; by default one Hydra multirun (`python -m decode -m
   head_path=a,b,c ...`), each result saved to <out_dir>/candidates/<key>.json as it arrives;
3. select: the candidate and method (ppsd or eesd) with the best *measured* speedup over ar, or ar itself
   when nothing beats it; write results.csv/json, report.md, the plots and selected_head/.

Re-running the same command on the same out_dir resumes: trained heads and measured candidates are kept.
The folder's sweep.json pins the base model and the measurement settings, so a folder is never mixed.
The last stdout line is one JSON object: the selected configuration and its measured speedup.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from heads.cli import entry_point
from heads.errors import UserError
from heads.files import atomic_write_json, atomic_write_text, read_prompts
from heads.head import HEAD_TYPES
from heads.schema import SWEEP

METHODS = ("ppsd", "eesd")


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


# --- files --------------------------------------------------------------------------------------

def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- running the project's own entry points ------------------------------------------------------

def hydra_value(value) -> str:
    """A value as a Hydra override token (quoted when it holds characters the grammar reserves)."""
    text = str(value)
    return text if re.fullmatch(r"[\w./\-+:~@]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_env() -> dict:
    """Children run as their own W&B runs: they must not attach to an agent's run of this process."""
    env = dict(os.environ)
    for key in ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RESUME"):
        env.pop(key, None)
    return env


def run_entry_point(command: list[str], log: Path, on_result=None) -> dict:
    """Run `python -m ...`, stream its stdout into `log`, call on_result(obj) for every JSON line; return the last."""
    log.parent.mkdir(parents=True, exist_ok=True)
    last = None
    with open(log, "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=child_env())
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                stripped = line.strip()
                if stripped.startswith("{"):
                    try:
                        obj = json.loads(stripped)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(obj, dict):
                        last = obj
                        if on_result is not None:
                            on_result(obj)
            code = proc.wait()
        except BaseException:
            proc.kill()  # ctrl-c / a crash of the sweep: never leave a child behind
            proc.wait()
            raise
    if code != 0:
        raise UserError(f"`{' '.join(command[1:4])} ...` failed (exit {code}): {last_error_line(log)} (log: {log})")
    if last is None:
        raise UserError(f"`{' '.join(command[1:4])} ...` printed no JSON result (log: {log})")
    return last


def last_error_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:300]


# --- step 1: train ------------------------------------------------------------------------------

def trained_heads(out: Path, cfg: DictConfig, candidates: list[Candidate], progress) -> dict[tuple[str, int], dict]:
    """(head, exit layer) -> training record; one multi-exit train job per head type for what is missing."""
    records: dict[tuple[str, int], dict] = {}
    for head in dict.fromkeys(c.head for c in candidates):
        layers = sorted({c.exit_layer for c in candidates if c.head == head})
        missing = []
        for layer in layers:
            record = read_json(out / "trained" / f"{head}-L{layer:02d}.json")
            if record and (Path(record["head_path"]) / "config.json").exists():
                records[head, layer] = record
            else:
                missing.append(layer)
        if missing:
            progress.set_postfix_str(f"training {head} heads at layers {missing}")
            # One folder per job (its layer set), so a killed job resumes from its own checkpoint.
            job_dir = (out / "heads" / f"{head}-L{'-'.join(map(str, missing))}").resolve()
            resume = (job_dir / "checkpoints" / "latest").exists()
            command = [sys.executable, "-m", "train", f"exit_layers=[{','.join(map(str, missing))}]",
                       f"head={head}", f"model={hydra_value(cfg.model)}", f"out_dir={hydra_value(job_dir)}",
                       f"resume={str(resume).lower()}", *cfg.train_overrides]
            result = run_entry_point(command, out / "logs" / f"train-{head}.log")
            for record in train_records(result, head):
                if record["exit_layer"] in missing:
                    atomic_write_json(out / "trained" / f"{head}-L{record['exit_layer']:02d}.json", record)
                    records[head, record["exit_layer"]] = record
            lost = [layer for layer in missing if (head, layer) not in records]
            if lost:
                raise UserError(f"`python -m train` reported no {head} head for layers {lost} (log: {out / 'logs'})")
        progress.update(1)
    return records


def train_records(result: dict, head: str) -> list[dict]:
    """Per-layer records from train's JSON line (a multi-exit `heads` list, or one head)."""
    if result.get("heads"):
        rows = result["heads"]
    elif result.get("head_paths"):
        layers = result.get("exit_layers") or [None] * len(result["head_paths"])
        rows = [{"exit_layer": e, "head_path": p} for e, p in zip(layers, result["head_paths"])]
    else:
        rows = [result]
    records = []
    for row in rows:
        record = {"head": head, "exit_layer": row.get("exit_layer"), "head_path": str(Path(row["head_path"]).resolve()),
                  "heldout_top1": row.get("heldout_top1"),
                  "heldout_expected_acceptance": row.get("heldout_expected_acceptance"),
                  "train_seconds": row.get("train_seconds", result.get("train_seconds"))}
        if record["exit_layer"] is None:  # fall back to the head's own config
            record["exit_layer"] = json.loads((Path(record["head_path"]) / "config.json").read_text())["exit_layer"]
        records.append(record)
    return records


# --- step 2: evaluate ---------------------------------------------------------------------------

def decode_args(cfg: DictConfig) -> list[str]:
    return [f"model={hydra_value(cfg.model)}", f"prompts={hydra_value(Path(cfg.prompts).expanduser().resolve())}",
            f"limit={cfg.limit}", f"max_new_tokens={cfg.max_new_tokens}", "method=ppsd", "compare=[ar,eesd]",
            *cfg.decode_overrides]


def evaluate(out: Path, cfg: DictConfig, candidates: list[Candidate], heads: dict, num_layers: int, progress) -> None:
    """Measure every candidate without a result yet; each result lands in candidates/<key>.json at once."""
    pending = [c for c in candidates if read_json(out / "candidates" / f"{c.key}.json") is None]
    progress.update(len(candidates) - len(pending))
    # One decode invocation per (stages, γ) group, sweeping head_path: Hydra runs the jobs in list order.
    for (stages, gamma), group in itertools.groupby(sorted(pending, key=lambda c: (c.stages, c.gamma or 0, c.head, c.exit_layer)),
                                                    key=lambda c: (c.stages, c.gamma)):
        group = list(group)
        fixed = [f"stages={stages}"] + ([f"gamma={gamma}"] if gamma else [])
        if cfg.launcher == "multirun":
            batches = [group]
        elif cfg.launcher == "subprocess":
            batches = [[c] for c in group]
        else:
            raise UserError(f"launcher={cfg.launcher}: use multirun or subprocess")
        for batch in batches:
            queue = list(batch)
            started = [time.monotonic()]

            def on_result(result: dict) -> None:
                if "speedup_vs_ar" not in result or not queue:
                    return
                # Hydra runs the jobs in list order; decode echoes head_path, which pins it down for sure.
                path = result.get("head_path")
                candidate = next((c for c in queue if heads[c.head, c.exit_layer]["head_path"] == path), queue[0])
                queue.remove(candidate)
                if result.get("exit_layer") not in (None, candidate.exit_layer):
                    raise UserError(f"decode reported exit layer {result.get('exit_layer')} for candidate {candidate.key}")
                row = candidate_row(candidate, heads[candidate.head, candidate.exit_layer], result,
                                    num_layers, time.monotonic() - started[0])
                atomic_write_json(out / "candidates" / f"{candidate.key}.json", row)
                started[0] = time.monotonic()
                progress.update(1)
                if queue:
                    progress.set_postfix_str(f"measuring {queue[0].key}")

            paths = ",".join(hydra_value(heads[c.head, c.exit_layer]["head_path"]) for c in batch)
            progress.set_postfix_str(f"measuring {batch[0].key}")
            command = [sys.executable, "-m", "decode"]
            if cfg.launcher == "multirun":
                # Each job's answers_*.jsonl + summary.json land in logs/decode-<time>/<stages, γ>-<job number>.
                sweep_dir = (out / "logs" / f"decode-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
                command += ["--multirun", f"hydra.sweep.dir={hydra_value(sweep_dir)}",
                            f"hydra.sweep.subdir=s{stages}{'-g' + str(gamma) if gamma else ''}-${{hydra.job.num}}"]
            else:
                run_dir = (out / "logs" / f"decode-{batch[0].key}").resolve()
                command += [f"hydra.run.dir={hydra_value(run_dir)}"]
            command += [f"head_path={paths}", *fixed, *decode_args(cfg)]
            run_entry_point(command, out / "logs" / f"decode-s{stages}{'-g' + str(gamma) if gamma else ''}.log", on_result)
            if queue:
                raise UserError(f"decode printed no result for {[c.key for c in queue]} (log: {out / 'logs'})")


def _method(result: dict, method: str) -> dict:
    """One method's figures from decode's JSON (top level for the method it ran, `compare` for the others)."""
    if result.get("method") == method:
        return result
    compare = result.get("compare") or {}
    return compare.get(method) or {}


def candidate_row(candidate: Candidate, trained: dict, result: dict, num_layers: int, seconds: float) -> dict:
    from decode.theory import ideal_ppsd_speedup

    ppsd, eesd, ar = _method(result, "ppsd"), _method(result, "eesd"), _method(result, "ar")
    alpha = ppsd.get("acceptance_rate")
    row = asdict(candidate) | {
        "key": candidate.key,
        "head_path": trained["head_path"],
        "acceptance_rate": alpha,
        "ppsd_speedup": ppsd.get("speedup_vs_ar"),
        "ppsd_predicted_speedup": ppsd.get("predicted_speedup"),
        "ppsd_tokens_per_s": ppsd.get("tokens_per_s"),
        "eesd_acceptance_rate": eesd.get("acceptance_rate"),
        "eesd_speedup": eesd.get("speedup_vs_ar"),
        "eesd_predicted_speedup": eesd.get("predicted_speedup"),
        "eesd_tokens_per_s": eesd.get("tokens_per_s"),
        "eesd_gamma": eesd.get("gamma", candidate.gamma),
        "ar_tokens_per_s": ar.get("tokens_per_s"),
        "lossless": result.get("lossless"),
        "heldout_top1": trained.get("heldout_top1"),
        "heldout_expected_acceptance": trained.get("heldout_expected_acceptance"),
        "train_seconds": trained.get("train_seconds"),
        "eval_seconds": round(seconds, 1),
        "num_layers": num_layers,
        "device": result.get("device"), "dtype": result.get("dtype"),  # what decode's `auto` resolved to
        "threads": result.get("threads"), "stage_threads": result.get("stage_threads"),
    }
    if alpha is not None and num_layers:
        row["ideal_speedup"] = ideal_ppsd_speedup(alpha, num_layers, candidate.exit_layer)
    speeds = {m: row[f"{m}_speedup"] for m in METHODS if row[f"{m}_speedup"] is not None}
    row["best_method"] = max(speeds, key=speeds.get) if speeds else None
    row["best_speedup"] = speeds.get(row["best_method"]) if speeds else None
    return row


# --- step 3: select and write -------------------------------------------------------------------

def select(rows: list[dict]) -> dict:
    """The best measured speedup over ar (ppsd or eesd); ar itself when nothing beats it."""
    measured = [r for r in rows if r.get("best_speedup") is not None]
    if not measured:
        raise UserError("no candidate produced a measured speedup: see the decode logs in <out_dir>/logs")
    best = max(measured, key=lambda r: r["best_speedup"])
    config = {"key": best["key"], "method": best["best_method"], "head": best["head"], "exit_layer": best["exit_layer"],
              "stages": best["stages"] if best["best_method"] == "ppsd" else None,
              "gamma": best.get("eesd_gamma") if best["best_method"] == "eesd" else None,
              "head_path": best["head_path"], "measured_speedup": best["best_speedup"],
              "acceptance_rate": best["acceptance_rate"]}
    if best["best_speedup"] > 1.0:
        return config | {"beats_ar": True}
    return {"method": "ar", "measured_speedup": 1.0, "beats_ar": False, "fastest_candidate": config,
            "note": f"nothing beats ar on this hardware: the fastest candidate ({best['key']}, {best['best_method']}) "
                    f"reached {best['best_speedup']:.2f}x"}


def finish(out: Path, manifest: dict, candidates: list[Candidate]) -> dict:
    from heads.hub import measured_from_results, write_head_folder
    from scripts.report import write_report

    keys = {c.key for c in candidates}
    # The table holds every candidate measured in this folder (earlier runs' too): same base, same settings.
    rows = sorted((r for r in (read_json(p) for p in (out / "candidates").glob("*.json")) if r),
                  key=lambda r: (r["head"], r["stages"], r.get("gamma") or 0, r["exit_layer"]))
    for row in rows:
        row["hardware"] = manifest["hardware"]
    selected = select([r for r in rows if r["key"] in keys])
    results = {k: manifest.get(k) for k in ("base_model", "model", "num_layers", "prompts", "limit", "max_new_tokens",
                                             "hardware")} | {"selected": selected, "candidates": rows}
    if selected["beats_ar"]:
        row = next(r for r in rows if r["key"] == selected["key"])
        measured = measured_from_results(row | {k: results[k] for k in ("prompts", "limit", "max_new_tokens")},
                                         {"exit_layer": row["exit_layer"], "head_type": row["head"]})
        measured["measured_at"] = time.strftime("%Y-%m-%d")
        write_head_folder(row["head_path"], out / "selected_head", measured=measured, overwrite=True)
        selected["selected_head"] = str((out / "selected_head").resolve())
        results["selected"] = selected
    from scripts.report import noise_warnings

    results["warnings"] = noise_warnings(rows)
    atomic_write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    write_report(out, results)
    return results


CSV_COLUMNS = ("key", "head", "exit_layer", "stages", "gamma", "acceptance_rate", "ppsd_speedup", "ppsd_predicted_speedup",
               "ideal_speedup", "ppsd_tokens_per_s", "eesd_acceptance_rate", "eesd_speedup", "eesd_predicted_speedup",
               "eesd_gamma", "eesd_tokens_per_s", "ar_tokens_per_s", "best_method", "best_speedup", "lossless",
               "heldout_top1", "heldout_expected_acceptance", "train_seconds", "eval_seconds", "head_path")


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def sweep(cfg: DictConfig) -> dict:
    if not cfg.prompts:
        raise UserError("no prompt set: pass prompts=<Spec-Bench-format JSONL>")
    read_prompts(cfg.prompts)  # the decoder's own reader: one-line errors for a missing, empty or malformed file
    base_model, num_layers = base_info(str(cfg.model))
    candidates = plan(cfg, num_layers)
    out = Path(cfg.out_dir or Path("sweeps") / model_slug(str(cfg.model))).expanduser()
    manifest = open_sweep_folder(out, manifest_for(cfg, base_model, num_layers) | {"hardware": describe_hardware()})
    head_jobs = len({c.head for c in candidates})
    with tqdm(total=head_jobs + len(candidates), desc="sweep", unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        heads = trained_heads(out, cfg, candidates, progress)
        evaluate(out, cfg, candidates, heads, num_layers, progress)
    results = finish(out, manifest, candidates)
    selected = results["selected"]
    return ({"out_dir": str(out.resolve()), "base_model": base_model, "candidates": len(candidates)} | selected
            | {"warnings": results["warnings"]})


def exit_on_sigterm() -> None:
    """`kill` (or a scheduler) stopping the sweep unwinds it like ctrl-c, so its child is killed too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@entry_point("sweep", SWEEP)
def main(cfg: DictConfig) -> None:
    exit_on_sigterm()
    print(json.dumps(sweep(cfg)), flush=True)


if __name__ == "__main__":
    main()
