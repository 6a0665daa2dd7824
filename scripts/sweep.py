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

Here: the steps and the entry point. The plan and the folder: scripts/sweep_plan.py; the rows and the
selection: scripts/sweep_select.py; report.md and the plots: scripts/report.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from heads.cli import entry_point
from heads.errors import UserError
from heads.files import atomic_write_json, read_prompts, run_folder
from heads.schema import SweepConfig
from scripts.sweep_plan import (Candidate, base_info, describe_hardware, manifest_for, model_slug, open_sweep_folder,
                                plan, read_json)
from scripts.sweep_select import candidate_row, finish


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


def sweep(cfg: DictConfig) -> dict:
    if not cfg.prompts:
        raise UserError("no prompt set: pass prompts=<Spec-Bench-format JSONL>")
    read_prompts(cfg.prompts)  # the decoder's own reader: one-line errors for a missing, empty or malformed file
    base_model, num_layers = base_info(str(cfg.model))
    candidates = plan(cfg, num_layers)
    out = Path(cfg.out_dir or Path("sweeps") / model_slug(str(cfg.model))).expanduser()
    with run_folder(out, "python -m scripts.sweep"):  # one sweep at a time in a folder (its jobs write below it)
        manifest = open_sweep_folder(out, manifest_for(cfg, base_model, num_layers) | {"hardware": describe_hardware()})
        head_jobs = len({c.head for c in candidates})
        with tqdm(total=head_jobs + len(candidates), desc="sweep", unit="step", file=sys.stderr,
                  dynamic_ncols=True) as progress:
            heads = trained_heads(out, cfg, candidates, progress)
            evaluate(out, cfg, candidates, heads, num_layers, progress)
        results = finish(out, manifest, candidates)
    selected = results["selected"]
    return ({"out_dir": str(out.resolve()), "base_model": base_model, "candidates": len(candidates)} | selected
            | {"warnings": results["warnings"]})


def exit_on_sigterm() -> None:
    """`kill` (or a scheduler) stopping the sweep unwinds it like ctrl-c, so its child is killed too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@entry_point("sweep", SweepConfig)
def main(cfg: DictConfig) -> None:
    exit_on_sigterm()
    print(json.dumps(sweep(cfg)), flush=True)


if __name__ == "__main__":
    main()
