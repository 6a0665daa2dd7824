"""Hostile input: every option with a wrong type or an out-of-range value, broken head folders, secrets on
the command line, tampered checkpoints, failing exports and a stage killed while another method runs.
Each is one line (`error: ...`) before any model loads, never a traceback or a leaked token."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt, MinLen
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pydantic import StringConstraints

from heads import UserError, build_head, load_head
from heads import config, schema
from heads.head import read_head_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_NotARealTokenButSecret123"


# ---------------------------------------------------------------- the schema, key by key

def _valid(config_name: str, tmp_path) -> tuple:
    """A composed config of `config_name` that passes its schema (required values filled in)."""
    fill = {"train": {"out_dir": str(tmp_path)},
            "decode": {"prompt": "hi", "head_path": "h"},
            "benchmark": {"head_path": "h"},
            "sweep": {"exit_layers": [4], "prompts": "p.jsonl"},
            "sweep_point": {"exit_layer": 4, "prompts": "p.jsonl"},
            "export": {"head_path": "h", "local_dir": "out"}}[config_name]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name)
    for key, value in fill.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


MODELS = {"train": schema.TrainConfig, "decode": schema.DecodeConfig, "benchmark": schema.BenchmarkConfig,
          "sweep": schema.SweepConfig, "sweep_point": schema.SweepPointConfig, "export": schema.ExportConfig}


def _members(annotation) -> list[tuple]:
    """A key's types besides null and auto: (bare type, constraints) each."""
    members = [config.unwrap(a) for a in config.alternatives(annotation)]
    return [(t, meta) for t, meta in members
            if t is not type(None) and not (get_origin(t) is Literal and get_args(t) == ("auto",))]


def _nonempty(annotation) -> bool:
    members = _members(annotation)
    return len(members) == 1 and get_origin(members[0][0]) is list and any(isinstance(m, MinLen) for m in members[0][1])


def _wrong_type(annotation):
    bare, meta = _members(annotation)[0]  # one item or a list of them: wrong when the item is
    if get_origin(bare) is Literal:
        return 7
    if get_origin(bare) is list:
        return "not-a-list"
    if get_origin(bare) is dict:
        return "not-a-mapping"
    if bare is str:
        return 5 if any(isinstance(m, StringConstraints) for m in meta) else {"a": 1}  # a device / a text
    return {int: "many", float: "lots", bool: "maybe"}[bare]


def _out_of_range(annotation):
    members = _members(annotation)
    if len(members) > 1:
        return []  # an empty list is never one item or a list of them
    bare, meta = members[0]
    if bare in (int, float):
        lo = [m.ge if isinstance(m, Ge) else m.gt for m in meta if isinstance(m, (Ge, Gt))]
        hi = [m.le if isinstance(m, Le) else m.lt for m in meta if isinstance(m, (Le, Lt))]
        return lo[0] - 1 if lo else (hi[0] + 1 if hi else None)
    if get_origin(bare) is Literal:
        return "no-such-choice"
    if bare is str and any(isinstance(m, StringConstraints) for m in meta):
        return "tpu:0"
    if get_origin(bare) is list:
        item = _out_of_range(get_args(bare)[0])
        return [] if _nonempty(annotation) else [item if item is not None else {}]
    if get_origin(bare) is dict:  # a key out of range
        key, value = get_args(bare)
        return {_out_of_range(key): 1.0}
    return None  # bool / str: no range


@pytest.mark.parametrize("name", list(MODELS))
def test_every_option_rejects_a_wrong_type_and_an_out_of_range_value(name, tmp_path):
    model, valid = MODELS[name], _valid(name, tmp_path)
    config.validate(valid, model)  # the filled-in defaults are valid
    keys = config.options(model)
    checked = 0
    for key, annotation in keys.items():
        for bad in (_wrong_type(annotation), _out_of_range(annotation)):
            if bad is None or (bad == [] and not _nonempty(annotation)):
                continue
            cfg = copy.deepcopy(valid)  # composed once: Hydra's compose is most of this test's time
            OmegaConf.update(cfg, key, bad, merge=False)
            with pytest.raises(UserError) as err:
                config.validate(cfg, model)
            message = str(err.value)
            assert "\n" not in message and key.split(".")[-1] in message, (key, bad, message)
            checked += 1
    assert checked >= len(keys)


def test_cross_key_checks():
    with pytest.raises(UserError, match="nothing to decode"):
        config.validate(OmegaConf.merge(_decode_cfg(), {"prompt": None}), schema.DecodeConfig)
    with pytest.raises(UserError, match="both prompt= and prompts="):
        config.validate(OmegaConf.merge(_decode_cfg(), {"prompts": "p.jsonl"}), schema.DecodeConfig)
    with pytest.raises(UserError, match="needs an exit head"):
        config.validate(OmegaConf.merge(_decode_cfg(), {"head_path": None}), schema.DecodeConfig)
    with pytest.raises(UserError, match="stage_layers"):
        config.validate(OmegaConf.merge(_decode_cfg(), {"stage_layers": [[1, 2], [2, 3], [3, 4]]}), schema.DecodeConfig)


def test_gamma_is_capped_where_batch_invariance_needs_it():
    """On batch-invariant kernels gamma + 1 positions must run row by row (MAX_ROWS of them at most)."""
    from decode.evaluate import resolve_settings
    from heads.batch_invariant import MAX_ROWS

    longest = MAX_ROWS - 1
    for batch_invariant in (True, "auto"):  # auto: on for eesd in bf16
        options = {"gamma": longest + 1, "batch_invariant": batch_invariant, "dtype": "bfloat16", "compare": ["eesd"]}
        with pytest.raises(UserError, match=rf"gamma={longest + 1} with batch-invariant kernels.*gamma <= {longest}"):
            resolve_settings(config.validate(OmegaConf.merge(_decode_cfg(), options), schema.DecodeConfig), quiet=True)
    assert resolve_settings(config.validate(OmegaConf.merge(_decode_cfg(), options | {"gamma": longest}),
                                            schema.DecodeConfig), quiet=True).batch_invariant
    assert not resolve_settings(config.validate(OmegaConf.merge(_decode_cfg(), options | {"dtype": "float32"}),
                                                schema.DecodeConfig), quiet=True).batch_invariant  # fp32: any gamma
    bench = OmegaConf.merge(_valid("benchmark", None), {"batch_invariant": True, "gammas": [1, longest + 1]})
    with pytest.raises(UserError, match=rf"gammas={longest + 1} with batch-invariant kernels"):
        config.validate(bench, schema.BenchmarkConfig)


def _decode_cfg():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.merge(compose(config_name="decode"), {"prompt": "hi", "head_path": "h"})


# ---------------------------------------------------------------- the real entry points: one line, exit 2

def _run(module: str, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"} | (env or {}))


@pytest.mark.parametrize("module, args, words", [
    ("train", ["head=lstm"], "Could not find 'head/lstm': use one of mlp, mlp2, transformer"),
    ("train", ["batch_size=two"], "batch_size=two is not valid"),
    ("train", ["no_such_key=1"], "'no_such_key' is not an option"),
    ("decode", ["stages=1", "prompt=hi", "head_path=x"], "stages=1 is not valid"),
    ("scripts.benchmark", ["alphas=[2]"], "alphas=[2] is not valid"),
    ("scripts.sweep_point", [], "exit_layer is required"),
])
def test_entry_points_print_one_line_and_exit_2(module, args, words):
    done = _run(module, *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], done.stderr


@pytest.mark.parametrize("module, args", [("train", ["batch_size=two"]),
                                          ("decode", ["stages=1", "prompt=hi", "head_path=x"])])
def test_bad_input_is_refused_before_torch_is_imported(module, args):
    """The one line comes first; torch and transformers take seconds to import."""
    code = (f"import runpy, sys\nsys.argv = [{module!r}, *{args!r}]\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert done.stdout.split() == ["2", "False"] and done.stderr.startswith("error:"), done.stdout + done.stderr


def test_a_token_on_the_command_line_is_never_printed(tmp_path, tiny_base):
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(tmp_path / "head")
    for args in ([f"head_path={tmp_path / 'head'}", "repo_id=me/x", f"token={SECRET}"],  # upload fails (offline)
                 [f"head_path={tmp_path / 'head'}", "repo_id=me/x", f"token={SECRET}", "nope=1"],  # Hydra's error
                 [f"head_path={tmp_path / 'nothing'}", "repo_id=me/x", f"token={SECRET}"]):
        done = _run("scripts.export", *args)
        assert done.returncode == 2 and SECRET not in done.stderr + done.stdout, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in done.stderr


def test_scrub_hides_every_known_secret(monkeypatch):
    from heads.cli import scrub

    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    monkeypatch.setattr(sys, "argv", ["x", f"token={SECRET}"])
    assert scrub(f"a {SECRET} b hf_fromtheenvironment c") == "a *** b *** c"


# ---------------------------------------------------------------- broken head folders

@pytest.fixture
def head(tiny_base, tmp_path):
    folder = tmp_path / "head"
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(folder)
    return folder


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))


@pytest.mark.parametrize("breakage, words", [
    (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    (lambda f: _edit_config(f, lambda c: c | {"exit_layer": "two"}), "exit_layer is \"two\""),
    (lambda f: _edit_config(f, lambda c: c | {"base_config": 3}), "base_config is 3"),
    (lambda f: _edit_config(f, lambda c: c | {"head_type": "lstm"}), "unknown head type 'lstm'"),
    (lambda f: _edit_config(f, lambda c: {k: v for k, v in c.items() if k != "base_model"}), "lacks ['base_model']"),
    (lambda f: _edit_config(f, lambda c: c | {"base_config": {"model_type": "no-such-model"}}), "base_config does not describe"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "model.safetensors is not a readable safetensors file"),
    (lambda f: _edit_config(f, lambda c: c | {"mlp_hidden": 48}), "model.safetensors does not match"),
    (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
])
def test_a_broken_head_folder_is_one_line_naming_the_file(head, tiny_base, breakage, words):
    breakage(head)
    with pytest.raises(UserError) as err:
        load_head(str(head))  # no base: nothing but the folder itself decides
    assert words in str(err.value) and "\n" not in str(err.value) and str(head) in str(err.value)


def test_keys_from_a_newer_version_are_ignored_with_a_warning(head, tiny_base, capsys):
    _edit_config(head, lambda c: c | {"draft_tree": {"width": 2}})
    assert load_head(str(head), tiny_base).exit_layer == 2
    assert "draft_tree" in capsys.readouterr().err
    assert "draft_tree" not in read_head_config(str(head))


# ---------------------------------------------------------------- resume guards

def _checkpoint(out: Path, name="step_0000004", identity=None) -> Path:
    folder = out / "checkpoints" / name
    (folder / "state").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(identity or {}))
    (out / "checkpoints" / "latest").write_text(name)
    return folder


IDENTITY = {"exit_layers": [3], "head_type": "mlp", "mlp_hidden": 64, "base_model": "tiny"}


@pytest.mark.parametrize("latest, words", [
    ("../../elsewhere", "not a checkpoint folder"),
    ("/etc", "not a checkpoint folder"),
    ("step_0000099", "which is missing"),
])
def test_latest_must_name_a_checkpoint_inside_the_run(tmp_path, latest, words):
    from train.checkpoint import resume_folder

    _checkpoint(tmp_path, identity=IDENTITY)
    (tmp_path / "checkpoints" / "latest").write_text(latest)
    with pytest.raises(UserError, match=words):
        resume_folder(tmp_path, IDENTITY)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    from train.checkpoint import resume_folder

    _checkpoint(tmp_path, identity=IDENTITY)
    with pytest.raises(UserError, match=r"another configuration \(exit_layers \[3\] -> \[4\]; head_type mlp -> transformer"):
        resume_folder(tmp_path, IDENTITY | {"exit_layers": [4], "head_type": "transformer"})
    assert resume_folder(tmp_path, IDENTITY).name == "step_0000004"


class _Planted:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (os.system, ("touch planted-by-pickle",))


def test_a_checkpoint_pickle_with_foreign_objects_is_refused_unloaded(tmp_path):
    from train.checkpoint import resume_folder

    folder = _checkpoint(tmp_path, identity=IDENTITY)
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Planted()}, folder / "state" / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="holds more than checkpoint state"):
        resume_folder(tmp_path, IDENTITY)
    assert not (ROOT / "planted-by-pickle").exists() and not Path("planted-by-pickle").exists()


def test_unwritable_out_dir_is_one_line(tmp_path):
    from heads.files import writable_folder

    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="out_dir=.* is not a writable folder .*: pass out_dir="):
        writable_folder(tmp_path / "file" / "run", what=f"out_dir={tmp_path / 'file' / 'run'}", fix="pass out_dir=X")
    with pytest.raises(UserError, match="is a file, not a folder"):
        writable_folder(tmp_path / "file", what="out_dir=file", fix="pass out_dir=X")


# ---------------------------------------------------------------- export failures

def test_export_failures_are_one_line(head, tmp_path, monkeypatch):
    import huggingface_hub

    from heads.hub import push_head, write_head_folder

    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        write_head_folder(str(head), tmp_path / "a-file")
    with pytest.raises(UserError, match="cannot be written"):
        write_head_folder(str(head), tmp_path / "a-file" / "below")

    def offline(self, *a, **k):
        raise ConnectionError(f"cannot reach the Hub (Authorization: Bearer {SECRET})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError, match="upload to me/x failed: ConnectionError") as err:
        push_head(str(head), "me/x", token=SECRET)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- a stage that dies while another method runs

def test_a_stage_killed_during_the_ar_baseline_is_an_error_within_seconds(tiny_base, head):
    from decode import Decoder, PipelineError

    ppsd = Decoder("ppsd", str(head), base=tiny_base, stages=2, timeout_s=60)
    ar = Decoder("ar", base=tiny_base)
    ar.watched = ppsd.watched = [ppsd.pipeline]  # as decode/evaluate.py's run wires them
    pid = ppsd.pipeline.processes[0].pid
    stream = ar.stream(list(range(100, 120)), 500, stop_at_eos=False)
    next(stream)
    os.kill(pid, 9)
    start = time.time()
    with pytest.raises(PipelineError, match=r"stage 1 .*exit code -9.*exited"):
        for _ in stream:
            pass
    assert time.time() - start < 5  # not the 60 s timeout: the next token notices
    assert ppsd.pipeline.closed
    ppsd.close()
