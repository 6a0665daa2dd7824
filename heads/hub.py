"""Publish a head folder: the model card, a local copy, and the push to the Hugging Face Hub.

A published head is the same three files `ExitHead.save_pretrained` writes (config.json,
model.safetensors, README.md). What export adds is the measured side: the decode/sweep result the
user passes in goes into `config.json` as `metadata.measured` (so a later export of the same folder
keeps it) and into a model card that says, at a glance, what the head is, how it was trained, what it
accepts on held-out text and how fast it decoded on which hardware, and how to load and decode with it.
The upload itself is a thin call into huggingface_hub (create_repo + upload_folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from heads.base import hub_offline
from heads.errors import UserError
from heads.files import atomic_folder
from heads.head import load_head, read_head_config

HEAD_FILES = ("config.json", "model.safetensors")
EXPORT_MARKER = ".ppsd-export"  # in a folder export wrote: the only kind of folder overwrite=true replaces
EXPORTED_FILES = {*HEAD_FILES, "README.md", EXPORT_MARKER}
TAGS = ["ppsd", "early-exit", "self-speculative-decoding", "speculative-decoding"]
LICENSE = "apache-2.0"  # the project's (pyproject.toml); the card also names the base, whose license applies to it
INSTALL = "git clone <the ppsd repository> ppsd && cd ppsd && bash scripts/setup.sh   # installs into ./.venv"

# The fields of a measurement that the card shows and config.json keeps (anything else is dropped).
MEASURED_FIELDS = ("method", "stages", "gamma", "speedup_vs_ar", "acceptance_rate", "tokens_per_s",
                   "ar_tokens_per_s", "predicted_speedup", "lossless", "ppsd_speedup", "eesd_speedup",
                   "eesd_gamma", "hardware", "prompts", "limit", "max_new_tokens", "dtype", "measured_at")


def measured_from_results(results: dict, config: dict) -> dict:
    """The measurement of this head in a sweep results.json, one sweep row, or one decode result JSON.

    A sweep table holds many heads: the row with this head's exit layer and type is used (its best
    method). A decode result is taken as is (it measured whatever head it was given).
    """
    if "candidates" in results:  # a sweep's results.json
        rows = [r for r in results["candidates"]
                if r.get("exit_layer") == config["exit_layer"] and r.get("head") == config["head_type"]]
        if not rows:
            raise UserError(f"the results file has no row for a {config['head_type']} head at exit layer "
                            f"{config['exit_layer']}: pass the results of a sweep or decode run that measured this head")
        row = max(rows, key=lambda r: r.get("best_speedup") or 0.0)
        return measured_from_results(row | {"hardware": row.get("hardware") or results.get("hardware"),
                                            **{k: results.get(k) for k in ("prompts", "limit", "max_new_tokens")
                                               if row.get(k) is None and k in results}}, config)
    if "best_speedup" in results:  # one sweep row
        method = results.get("best_method")
        eesd = method == "eesd"
        speed = {"method": method, "speedup_vs_ar": results.get("best_speedup"),
                 "stages": None if eesd else results.get("stages"), "gamma": results.get("eesd_gamma") if eesd else None,
                 "acceptance_rate": results.get("eesd_acceptance_rate" if eesd else "acceptance_rate"),
                 "tokens_per_s": results.get(f"{method}_tokens_per_s"),
                 "predicted_speedup": results.get(f"{method}_predicted_speedup"),
                 "ar_tokens_per_s": results.get("ar_tokens_per_s")}
        return _keep(results | speed)
    if "speedup_vs_ar" in results:  # one decode result
        exit_layer = results.get("exit_layer")
        if exit_layer is not None and exit_layer != config["exit_layer"]:
            raise UserError(f"the results file measured exit layer {exit_layer} but the head exits at "
                            f"{config['exit_layer']}: pass the results of a run that used this head")
        ar = (results.get("compare") or {}).get("ar") or {}
        return _keep(results | {"ar_tokens_per_s": results.get("ar_tokens_per_s", ar.get("tokens_per_s"))})
    raise UserError("the results file is neither a sweep results.json nor a `python -m decode` result: "
                    "pass results=<sweep folder>/results.json or a saved decode JSON line")


def _keep(measured: dict) -> dict:
    return {k: measured[k] for k in MEASURED_FIELDS if measured.get(k) is not None}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return str(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"training": {"lr": 1}} -> {"training.lr": 1}, for a flat settings table."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _find(metadata: dict, *names: str):
    """The first of `names` anywhere in (nested) metadata."""
    stack = [metadata]
    while stack:
        node = stack.pop(0)
        for name in names:
            if name in node:
                return node[name]
        stack += [v for v in node.values() if isinstance(v, dict)]
    return None


def _load_name(exact: dict, base_model: str) -> str:
    """What to pass to load_base: exactly the recorded base (the embedded copy's name when it is one)."""
    from heads.base import EMBEDDED_MODELS, identity_source

    if exact.get("id"):
        return identity_source(exact)
    return next((name for name, e in EMBEDDED_MODELS.items() if e.origin == base_model), base_model)


def _exact(exact: dict) -> str:
    """The recorded base in words: an embedded copy says it is a dequantized gguf of `quantization`."""
    if not exact.get("id"):
        return "not recorded (a head from an older ppsd: pass model= to decode)"
    text = f"`{exact['id']}`, sha256 `{exact['sha256']}`"
    if exact.get("quantization"):
        text += f" (a {exact['quantization']} gguf, 4-bit weights dequantized to fp32 when loaded)" \
            if exact["quantization"].startswith("Q4") else f" (a {exact['quantization']} gguf)"
    if exact.get("revision"):
        text += f", revision `{exact['revision']}`"
    return text


def model_card(config: dict, repo_id: str | None = None) -> str:
    """README.md (YAML metadata + Markdown) for a head with this config.json."""
    metadata = dict(config.get("metadata") or {})
    measured = metadata.pop("measured", None) or {}
    base_model, exact = config["base_model"], config.get("base") or {}
    heldout = metadata.get("heldout") if isinstance(metadata.get("heldout"), dict) else {}
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) is not None and not Path(base_model).exists()
    # No library_name: "ppsd" on PyPI is an unrelated package, and the Hub would link this card to it.
    card_data = ModelCardData(license=LICENSE, tags=TAGS + [config["head_type"]],
                              base_model=base_model if is_hub_id else None)
    copy = f" ({exact['quantization']} copy)" if exact.get("quantization") else ""
    lines = [f"# PPSD exit head: {config['head_type']} at layer {config['exit_layer']} of `{base_model}`{copy}", "",
             "An early-exit draft head for lossless self-speculative decoding with "
             "ppsd, a Python toolkit for Pipeline-Parallel Self-Speculative Decoding ([arXiv 2509.19368](https://arxiv.org/abs/2509.19368)). "
             "It predicts the base model's next token from an intermediate layer; the decoders check every draft "
             "against the full model, so outputs are token-for-token identical to plain decoding.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _facts(config, metadata, heldout, measured)]
    training = _flatten({k: v for k, v in metadata.items() if "heldout" not in k})
    for title, header, table in (("Training data and settings", "setting", training),
                                 ("Held-out evaluation", "metric", _flatten(heldout)),
                                 ("Measurement", "figure", measured)):
        if table:
            lines += ["", f"## {title}", "", f"| {header} | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in table.items()]
    lines += _usage(repo_id or "path/to/this/folder", measured, _load_name(exact, base_model))
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))


def _facts(config: dict, metadata: dict, heldout: dict, measured: dict) -> list[tuple[str, str]]:
    """The card's first table: what the head is, how well it agrees, and what was measured."""
    base_model, revision, exact = config["base_model"], config.get("base_revision"), config.get("base") or {}
    num_layers = config["base_config"].get("num_hidden_layers")
    top1 = heldout.get("top1", _find(metadata, "heldout_top1"))
    expected = heldout.get("expected_acceptance", _find(metadata, "heldout_expected_acceptance"))
    facts = [
        ("Base model", f"`{base_model}`" + (f" (revision `{revision}`)" if revision else "")
         + (f", as its {exact['quantization']} copy below, not the original weights" if exact.get("quantization") else "")),
        ("Exact base (trained on, and the only one decode loads)", _exact(exact)),
        ("Exit layer", f"{config['exit_layer']} of {num_layers} (the head reads the hidden state after layers [0, {config['exit_layer']}))"),
        ("Head type", config["head_type"] + (f" (hidden {config['mlp_hidden']})" if config["head_type"] == "mlp" and config.get("mlp_hidden") else "")),
        ("Held-out top-1 agreement with the full model", _fmt(top1) if top1 is not None else "not recorded"),
        ("Held-out expected acceptance", _fmt(expected) if expected is not None else "not recorded"),
    ]
    if not measured:
        return facts + [("Measured speedup", "not measured yet (export with results=<decode or sweep result JSON>)")]
    how = measured.get("method", "?")
    if how == "ppsd" and measured.get("stages"):
        how += f", {measured['stages']} stages"
    if how == "eesd" and (measured.get("gamma") or measured.get("eesd_gamma")):
        how += f", γ={measured.get('gamma') or measured.get('eesd_gamma')}"
    facts += [
        ("Measured speedup over autoregressive decoding",
         f"{measured['speedup_vs_ar']:.2f}× ({how})" if "speedup_vs_ar" in measured else "not recorded"),
        ("Measured acceptance rate", _fmt(measured.get("acceptance_rate", "not recorded"))),
        ("Measured on", f"{measured.get('hardware', 'machine not recorded')}, "
                        f"{measured.get('measured_at', 'date not recorded')}"),
    ]
    if measured.get("prompts"):
        facts.append(("Prompts", f"{measured['prompts']} (limit {measured.get('limit')}, "
                                 f"{measured.get('max_new_tokens')} new tokens)"))
    return facts


def _usage(where: str, measured: dict, load_name: str) -> list[str]:
    """The card's "How to use": install, text in and out, the head and its base, measure it."""
    return ["", "## How to use", "", "Install ppsd (Python 3.10+; CPU torch, or a CUDA build installed first):", "",
            "```bash", INSTALL, "```", "",
            "Text in, text out (greedy output is identical to the base model's own decoding; ppsd starts its "
            "stages as processes, hence the `__main__` guard):", "",
            "```python",
            "from decode import TextDecoder", "",
            'if __name__ == "__main__":',
            f'    with TextDecoder.from_pretrained("{where}", method="{measured.get("method") or "ppsd"}") as dec:',
            '        print(dec.generate("Explain speculative decoding in two sentences."))',
            "```", "", "The head and its base alone:", "", "```python",
            "from heads import load_base, load_head", "",
            f'base = load_base("{load_name}")',
            f'head = load_head("{where}", base)  # a hub id or a local folder',
            "```", "", "Measure it against plain decoding on your machine:", "",
            "```bash",
            f"python -m decode method=ppsd stages={measured.get('stages') or 2} head_path={where} "
            f"prompts=decode/prompts/default.jsonl compare=[ar,eesd]   # the base comes from the head's config",
            "```", ""]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_source_files(head_path: str, folder: Path) -> None:
    """The head's own files, never what a link points to elsewhere: config.json and model.safetensors must be
    regular files in the head folder (or, for a hub id, in its cache entry, whose files link to its blobs)."""
    real = folder.resolve()
    local = Path(head_path).expanduser().is_dir()
    allowed = real if local or len(real.parents) < 2 else real.parents[1]  # models--owner--name/snapshots/<rev>
    for name in HEAD_FILES:
        file = folder / name
        if not file.exists():
            raise UserError(f"head folder '{folder}' has no {name}: is it a ppsd head folder?")
        real = file.resolve()
        if file.is_symlink() and not _inside(real, allowed):
            raise UserError(f"{file} is a link to {real}, outside the head folder: export copies only the head's own "
                            "files; replace the link with the file itself")
        if not real.is_file():
            raise UserError(f"{file} is not a file: is '{folder}' a ppsd head folder?")


def check_target(source: Path, target: Path, overwrite: bool) -> None:
    """local_dir is a new folder, or (overwrite=true) one that export itself wrote and nothing else has touched;
    it never holds the head, nor lies inside it."""
    source = source.resolve()
    if _inside(source, target) or _inside(target, source):
        where = "is the head folder itself" if source == target else \
            "contains the head folder" if _inside(source, target) else "is inside the head folder"
        raise UserError(f"local_dir '{target}' {where} ({source}): write to a folder of its own")
    if target.exists() and not target.is_dir():
        raise UserError(f"local_dir '{target}' is a file: pass a folder path (new or empty)")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise UserError(f"local_dir '{target}' exists and is not empty: pick a new folder or pass overwrite=true")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in EXPORTED_FILES or p.is_dir() or p.is_symlink())
    if not (target / EXPORT_MARKER).is_file() or foreign:
        why = f"it holds {', '.join(foreign[:3])}" if foreign else f"it has no {EXPORT_MARKER}"
        raise UserError(f"local_dir '{target}' was not written by export ({why}): overwrite=true replaces only "
                        "an earlier export's folder; pick a new folder")


def write_head_folder(head_path: str, local_dir: str | os.PathLike, *, measured: dict | None = None,
                      repo_id: str | None = None, overwrite: bool = False, mark: bool = True) -> Path:
    """Copy a head to `local_dir` with its measurement in config.json and a fresh model card (atomic).

    Nothing is copied before the head is checked: its files its own (no links out of it), its weights a
    safetensors file of the shapes config.json implies, all finite. mark: leave EXPORT_MARKER in the folder,
    the sign a later overwrite=true looks for."""
    config = read_head_config(head_path)
    source = Path(config.pop("_folder"))
    target = Path(local_dir).expanduser().resolve()
    check_target(source, target, overwrite)
    check_source_files(head_path, source)
    load_head(str(source), refuse_nonfinite=True)  # the header, the shapes against config.json, finite values
    if measured:
        config["metadata"] = dict(config.get("metadata") or {}) | {"measured": measured}
    try:
        with atomic_folder(target) as tmp:
            shutil.copyfile(source / "model.safetensors", tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (tmp / "README.md").write_text(model_card(config, repo_id))
            if mark:
                (tmp / EXPORT_MARKER).write_text("written by python -m scripts.export; overwrite=true may replace it\n")
    except OSError as e:
        raise UserError(f"local_dir '{target}' cannot be written ({e.strerror or type(e).__name__}"
                        f"{': ' + str(e.filename) if e.filename else ''}): pass a folder you can write") from None
    return target


def _upload_problem(e: Exception) -> str:
    """Why an upload failed, in words the user can act on (never the request's headers)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if hub_offline():
        return "HF_HUB_OFFLINE=1 forbids uploading: unset it, or export with local_dir=<folder>"
    if status in (401, 403):
        return f"the Hub refused the token (HTTP {status}): set HF_TOKEN to a token with write access, or run `hf auth login`"
    if status == 404:
        return "no such repo or owner (HTTP 404): check repo_id=owner/name"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}{': ' + first if first else ''}: check the network and HF_TOKEN, or export with local_dir=<folder>"


def push_head(head_path: str, repo_id: str, *, private: bool = False, token: str | None = None,
              measured: dict | None = None, commit_message: str | None = None) -> str:
    """Upload a head (with its model card) to the Hub; token None = HF_TOKEN or `hf auth login`."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise UserError(f"repo_id '{repo_id}' is not a Hub repo id: use owner/name")
    config = read_head_config(head_path)
    with tempfile.TemporaryDirectory(prefix="ppsd-export-") as tmp:
        folder = write_head_folder(head_path, Path(tmp) / "head", measured=measured, repo_id=repo_id, mark=False)
        api = HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                              commit_message=commit_message or f"ppsd {config['head_type']} head, exit layer {config['exit_layer']}")
        except Exception as e:  # noqa: BLE001: offline, refused, rate-limited: one line (the token is never in it)
            raise UserError(f"upload to {repo_id} failed: {_upload_problem(e)}") from None
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
