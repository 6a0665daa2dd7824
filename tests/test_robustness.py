"""Nothing lost, nothing leaked (issue 21): a run owns its out_dir, failed runs leave the previous files as they
were, export touches only its own files, tokens never reach disk, missing resources and full disks are one line,
non-UTF-8 input names the byte, and a head with NaN weights samples without crashing.

Subprocess runs on the tiny random model where the behaviour is the command's; a real full disk is a small tmpfs
(mounted when the tests run as root, else those tests skip and the in-process ones stand for them)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from heads import UserError, build_head, load_head
from heads.files import atomic_write_text, read_prompts, run_folder, staged_files
from heads.config import validate
from heads.schema import DecodeConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
SECRET = "hf_NotARealTokenButSecret123"


def _run(module, *args, env=None, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV | (env or {}))


def _one_line_error(done, code=2) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and lines and lines[-1].startswith("error:"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def head(tiny_base, tmp_path):
    folder = tmp_path / "head"
    h = build_head(tiny_base, "mlp", exit_layer=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    h.save_pretrained(folder)
    return folder


def _questions(path: Path, n: int, turns: int = 1) -> str:
    path.write_text("".join(json.dumps({"question_id": i, "category": "c",
                                        "turns": [f"Tell me story {i}, part {t}." for t in range(turns)]}) + "\n"
                            for i in range(n)))
    return str(path)


def _decode_args(model, prompts, out_dir, *extra):
    return ["method=ar", "compare=[ar]", f"model={model}", f"prompts={prompts}", "threads=1", "warmup=false",
            f"out_dir={out_dir}", *extra]


def _decode_cfg(**values):
    cfg = OmegaConf.load(ROOT / "conf" / "decode.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    return validate(OmegaConf.merge(cfg, {"threads": 1, "warmup": False} | values), DecodeConfig)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `size` (a real ENOSPC); skips where mounting is not allowed (not root)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]}): the in-process tests stand for it")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- a run owns its out_dir


def test_a_second_run_into_a_held_folder_refuses_and_a_killed_holder_leaves_no_lock(tmp_path):
    with run_folder(tmp_path / "out", "first"):
        with pytest.raises(UserError, match=r"out_dir=.*out is in use by another run \(first, pid \d+\)"):
            with run_folder(tmp_path / "out", "second"):
                pass
    with run_folder(tmp_path / "out", "again"):  # released at the end of the block
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from heads.files import run_folder\n"
                               f"with run_folder({str(tmp_path / 'out')!r}, 'holder'):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="in use by another run"):
        with run_folder(tmp_path / "out", "second"):
            pass
    holder.kill()
    holder.wait()
    with run_folder(tmp_path / "out", "after a kill"):  # the kernel dropped the lock with the process
        pass


def test_concurrent_decodes_into_one_out_dir(tiny_model_dir, tmp_path):
    """The second run refuses in one line; the first one's answers and summary are whole and agree."""
    out = tmp_path / "out"
    long = _questions(tmp_path / "long.jsonl", 6)
    first = subprocess.Popen([sys.executable, "-m", "decode",
                              *_decode_args(tiny_model_dir, long, out, "max_new_tokens=400")],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: out.is_dir() and any(p.name.startswith(".answers_ar.jsonl.tmp-") for p in out.iterdir()), first)
    second = _run("decode", *_decode_args(tiny_model_dir, _questions(tmp_path / "short.jsonl", 1), out,
                                          "max_new_tokens=5"))
    assert "is in use by another run (python -m decode, pid" in _one_line_error(second)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    data = (out / "answers_ar.jsonl").read_bytes()
    assert b"\0" not in data and [json.loads(l)["question_id"] for l in data.splitlines()] == list(range(6))
    assert json.loads((out / "summary.json").read_text())["questions"] == 6
    assert sorted(p.name for p in out.iterdir()) == [".ppsd-run.lock", "answers_ar.jsonl", "summary.json"]


def test_a_failed_rerun_leaves_the_previous_files_as_they_were(head, tiny_model_dir, tmp_path, monkeypatch):
    import decode.evaluate as evaluate

    out = tmp_path / "out"
    cfg = dict(method="eesd", compare=["ar"], head_path=str(head), model=tiny_model_dir, max_new_tokens=8,
               prompts=_questions(tmp_path / "q.jsonl", 3))
    evaluate.run(_decode_cfg(**cfg), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"answers_ar.jsonl", "answers_eesd.jsonl", "summary.json"} <= set(before)

    answer, calls = evaluate.answer, []

    def fails_on_the_third_call(*args, **kwargs):  # the rerun dies with answers half written
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine fell over")
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluate, "answer", fails_on_the_third_call)
    with pytest.raises(RuntimeError, match="fell over"):
        evaluate.run(_decode_cfg(**cfg), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no temporary file beside them


def test_a_later_turn_that_overflows_the_context_is_found_before_the_first_runs(tiny_model_dir, tmp_path, monkeypatch):
    import decode.evaluate as evaluate

    monkeypatch.setattr(evaluate, "answer", lambda *a, **k: pytest.fail("a turn ran before the check"))
    prompts = _questions(tmp_path / "q.jsonl", 2, turns=2)
    with pytest.raises(UserError, match=r"question 0: its 2 turn\(s\) may reach \d+ tokens \(\d+ of prompts, up "
                                        r"to max_new_tokens=600 per answer\), which exceeds the model's context of 1024"):
        evaluate.run(_decode_cfg(model=tiny_model_dir, prompts=prompts, method="ar", compare=["ar"],
                                 max_new_tokens=600), tmp_path / "out")
    assert not list((tmp_path / "out").glob("answers_*"))


def test_decode_into_a_file_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    done = _run("decode", *_decode_args(tiny_model_dir, _questions(tmp_path / "q.jsonl", 1), tmp_path / "a-file",
                                        "max_new_tokens=4"))
    assert "out_dir=" in _one_line_error(done) and "is a file, not a folder" in done.stderr
    assert "threads (ar/eesd)" not in done.stdout  # printed once the base has loaded
    assert (tmp_path / "a-file").read_text() == "keep me"


# ---------------------------------------------------------------- full disks


def test_a_full_disk_during_decode_is_one_line_and_leaves_no_partial_file(tiny_model_dir, tmp_path, small_disk):
    disk = small_disk("2m")
    out = disk / "out"
    proc = subprocess.Popen([sys.executable, "-m", "decode",
                             *_decode_args(tiny_model_dir, _questions(tmp_path / "q.jsonl", 6), out,
                                           "max_new_tokens=300")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: out.is_dir() and any(".tmp-" in p.name for p in out.iterdir()), proc)
    _fill(disk)
    _, err = proc.communicate(timeout=300)
    line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    assert line.startswith(f"error: no space left on the device of {out}") and "half written is removed" in line
    assert sorted(p.name for p in out.iterdir()) == [".ppsd-run.lock"]


def test_a_full_disk_while_writing_answers_in_process(tmp_path, monkeypatch):
    (tmp_path / "answers.jsonl").write_text("the previous run\n")
    with pytest.raises(UserError, match="no space left on the device of .* while writing answers"):
        with staged_files(tmp_path, "writing answers") as output:
            output.open("answers.jsonl").write("x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]
    assert (tmp_path / "answers.jsonl").read_text() == "the previous run\n"

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(UserError, match="while writing metrics.json"):
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch's zip writer reports a short write as "unexpected pos": the partial checkpoint goes, `latest` and
    the checkpoint it names stay."""
    import train.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "barrier", lambda: None)

    class Engine:
        module = torch.nn.Linear(2, 2)

        def __init__(self, full=False):
            self.full = full

        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (Path(folder) / tag).mkdir(parents=True)
            (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
            if self.full:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2176 vs 2070")

    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(Engine(), root, 2, 0, {})
    with pytest.raises(UserError, match=r"no space left .* checkpoint of step 4 .*: checkpoints/step_0000002 is kept: "
                                        r"free some space, then rerun with resume=true"):
        ckpt.save_checkpoint(Engine(full=True), root, 4, 0, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert (root / "latest").read_text() == "step_0000002"


def test_a_full_disk_during_train_keeps_the_last_checkpoint_and_resumes(tiny_model_dir, tmp_path, small_disk):
    from tests.test_train import _tiny_overrides

    disk = small_disk("24m")
    prompts = _questions(tmp_path / "p.jsonl", 16)
    args = _tiny_overrides(tiny_model_dir, prompts, disk / "run", tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (disk / "run" / "checkpoints" / "latest").exists(), proc)
    _fill(disk)
    _, err = proc.communicate(timeout=300)
    line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    assert "no space left" in line and "free some space, then rerun with resume=true" in line, line
    kept = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir())
    assert kept[0] == "latest" and all(name.startswith("step_") for name in kept[1:]), kept  # no .tmp-step_ left
    (disk / "filler").unlink()
    done = _run("train", *args, "resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in (disk / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, json.loads(done.stdout.strip().splitlines()[-1])["steps"] + 1))


def test_a_disk_too_small_for_the_run_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, small_disk):
    from tests.test_train import _tiny_overrides

    disk = small_disk("300k")
    done = _run("train", *_tiny_overrides(tiny_model_dir, _questions(tmp_path / "p.jsonl", 4), disk / "run",
                                          tmp_path / "cache"))
    assert re.search(r"out_dir=.* has [\d.]+ KiB free and this run needs about [\d.]+ MiB: free some space",
                     _one_line_error(done))


# ---------------------------------------------------------------- caches, HOME, DeepSpeed's build folder


def test_an_unwritable_cache_or_home_names_the_variable_to_set(tmp_path):
    (tmp_path / "a-file").write_text("")
    plain = {k: v for k, v in ENV.items() if k not in ("PPSD_CACHE", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR")}
    args = ["method=ar", "compare=[ar]", "prompt=hi", "max_new_tokens=2", f"out_dir={tmp_path / 'out'}"]
    for env, words in (({"PPSD_CACHE": str(tmp_path / "a-file" / "cache")}, "set PPSD_CACHE to a writable folder"),
                       ({"HOME": str(tmp_path / "a-file")}, "PPSD_CACHE is unset: it lies under HOME=")):
        done = subprocess.run([sys.executable, "-m", "decode", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=plain | env)
        assert words in _one_line_error(done), done.stderr


def test_train_under_an_unwritable_home_names_torch_extensions_dir(tiny_model_dir, tmp_path):
    from tests.test_train import _tiny_overrides

    (tmp_path / "a-file").write_text("")
    plain = {k: v for k, v in ENV.items() if k not in ("PPSD_CACHE", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR")}
    done = subprocess.run([sys.executable, "-m", "train",
                           *_tiny_overrides(tiny_model_dir, _questions(tmp_path / "p.jsonl", 4), tmp_path / "run",
                                            tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=plain | {"HOME": str(tmp_path / "a-file")})
    assert "DeepSpeed's build folder" in _one_line_error(done) and "set TORCH_EXTENSIONS_DIR=" in done.stderr


# ---------------------------------------------------------------- export


def _marked_export(head, folder):
    from heads.hub import write_head_folder

    return write_head_folder(str(head), folder)


def test_export_into_a_parent_of_the_head_deletes_nothing(head, tmp_path):
    parent = head.parent
    (parent / "notes.txt").write_text("precious")
    done = _run("scripts.export", f"head_path={head}", f"local_dir={parent}", "overwrite=true")
    assert "contains the head folder" in _one_line_error(done)
    done = _run("scripts.export", f"head_path={head}", f"local_dir={head / 'inside'}", "overwrite=true")
    assert "is inside the head folder" in _one_line_error(done)
    assert (parent / "notes.txt").read_text() == "precious" and load_head(str(head)).exit_layer == 2


def test_overwrite_replaces_only_an_earlier_export(head, tmp_path):
    from heads.hub import write_head_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # looks like a head folder, but export did not write it
    with pytest.raises(UserError, match="was not written by export .*no .ppsd-export"):
        write_head_folder(str(head), mine, overwrite=True)
    assert (mine / "config.json").read_text() == "{}"
    exported = _marked_export(head, tmp_path / "export")
    assert write_head_folder(str(head), exported, overwrite=True) == exported  # export's own folder: replaced
    (exported / "my-notes.txt").write_text("added later")
    with pytest.raises(UserError, match="was not written by export .*holds my-notes.txt"):
        write_head_folder(str(head), exported, overwrite=True)
    assert (exported / "my-notes.txt").exists()


@pytest.mark.parametrize("kind", ["link", "text", "shapes", "nan"])
def test_export_checks_the_weights_before_copying_anything(head, tmp_path, kind):
    from heads.hub import write_head_folder

    weights = head / "model.safetensors"
    if kind == "link":
        (tmp_path / "elsewhere.txt").write_text("not weights")
        weights.unlink()
        weights.symlink_to(tmp_path / "elsewhere.txt")
        words = "is a link to .*elsewhere.txt, outside the head folder"
    elif kind == "text":
        weights.write_text("not weights")
        words = "is not a readable safetensors file"
    elif kind == "shapes":
        state = load_file(weights)
        save_file({k: v[:, :4].contiguous() if v.dim() == 2 else v for k, v in state.items()}, weights)
        words = "does not match"
    else:
        state = load_file(weights)
        state["up.weight"][0, 0] = float("nan")
        save_file(state, weights)
        words = r"holds NaN/Inf weights \(1 in up.weight\)"
    with pytest.raises(UserError, match=words):
        write_head_folder(str(head), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_link_inside_the_head_folder_is_its_own_file(head, tmp_path):
    (head / "weights-v1.safetensors").write_bytes((head / "model.safetensors").read_bytes())
    (head / "model.safetensors").unlink()
    (head / "model.safetensors").symlink_to("weights-v1.safetensors")
    (head / "notes.txt").write_text("not part of the head")
    folder = _marked_export(head, tmp_path / "out")
    assert not (folder / "model.safetensors").is_symlink() and load_head(str(folder)).exit_layer == 2
    assert sorted(p.name for p in folder.iterdir()) == [".ppsd-export", "README.md", "config.json", "model.safetensors"]


# ---------------------------------------------------------------- secrets and flags


@pytest.mark.parametrize("flags", [["-m"], ["--multirun"], ["--cfg", "job"], ["--cfg", "all"], ["--info", "config"]])
def test_a_token_is_refused_where_hydra_would_write_or_print_it(head, tmp_path, flags):
    done = _run("scripts.export", *flags, f"head_path={head}", "repo_id=me/x,me/y", f"token={SECRET}", cwd=tmp_path)
    assert "set HF_TOKEN" in _one_line_error(done) and SECRET not in done.stdout + done.stderr
    assert not any(SECRET in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert not (tmp_path / "multirun").exists()


def test_the_config_still_prints_without_a_token(head, tmp_path):
    done = _run("scripts.export", "--cfg", "job", f"head_path={head}", "repo_id=me/x", cwd=tmp_path)
    assert done.returncode == 0 and "repo_id: me/x" in done.stdout, done.stderr


@pytest.mark.parametrize("args, words", [(["--bogus"], "unknown flag --bogus"),
                                         (["--cfg", "bogus"], "argument --cfg/-c: invalid choice: 'bogus'")])
def test_an_unknown_flag_is_one_line_and_exit_2(args, words):
    done = _run("decode", *args)
    assert words in _one_line_error(done) and len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- non-UTF-8 input


def test_non_utf8_files_name_the_file_and_the_byte(tmp_path, tiny_model_dir):
    from train import data as D
    from train.checkpoint import resume_folder

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"turns": ["ok"]}).encode() + b"\n" + b'{"turns": ["caf\xe9"]}\n')
    where = rf"{bad} is not UTF-8 text \(byte 0xe9 at offset 33, line 2\)"
    with pytest.raises(UserError, match=where):
        read_prompts(bad)
    with pytest.raises(UserError, match=where):
        D.load_prompts(str(bad))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_bytes(b"step_\xff\xfe")
    with pytest.raises(UserError, match=r"latest is not UTF-8 text \(byte 0xff at offset 5, line 1\)"):
        resume_folder(tmp_path / "run", {})
    done = _run("decode", *_decode_args(tiny_model_dir, bad, tmp_path / "out", "max_new_tokens=2"))
    assert "is not UTF-8 text (byte 0xe9 at offset 33, line 2)" in _one_line_error(done)


def test_a_metrics_log_cut_short_is_trimmed_on_resume(tmp_path):
    from train.checkpoint import metrics_lines_upto

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # the disk filled mid-line
    metrics_lines_upto(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


# ---------------------------------------------------------------- NaN / Inf heads


def test_nonfinite_drafts_never_reach_the_sampler():
    from decode.common import choose, make_generator, verify

    logits = torch.full((50,), float("nan"))
    token, q = choose(logits, 0.8, make_generator(0))
    assert 0 <= token < 50 and torch.isfinite(q).all() and q.sum() == 1
    model = torch.randn(50)
    for seed in range(20):  # a NaN q from any source: the exact rule on a point mass, never a crash
        y, ok = verify(model, 7, torch.full((50,), float("nan")), 0.8, make_generator(seed))
        assert 0 <= y < 50 and ok == (y == 7)
    inf = torch.zeros(50)
    inf[3] = float("inf")
    assert choose(inf, 0.8, make_generator(0))[0] == 3


def test_a_head_with_nan_or_inf_weights_warns_once_on_load(head, tiny_base, capsys):
    state = load_file(head / "model.safetensors")
    state["up.weight"][0, 0] = float("nan")
    save_file(state, head / "model.safetensors")
    load_head(str(head), tiny_base)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "NaN/Inf weights (1 in up.weight" in err[0]
    state["up.weight"][0, 0] = 1e6  # finite in fp32, Inf in fp16
    save_file(state, head / "model.safetensors")
    load_head(str(head), dtype=torch.float32)
    assert capsys.readouterr().err == ""
    load_head(str(head), dtype=torch.float16)
    assert "1 in up.weight, in torch.float16" in capsys.readouterr().err


def test_sampling_with_a_nan_head_rejects_its_drafts(head, tiny_model_dir, tmp_path):
    state = load_file(head / "model.safetensors")
    state["up.weight"][0, 0] = float("nan")
    save_file(state, head / "model.safetensors")
    done = _run("decode", *_decode_args(tiny_model_dir, _questions(tmp_path / "q.jsonl", 1), tmp_path / "out",
                                        "max_new_tokens=12", "temperature=0.8", "method=ppsd", "compare=[ar,eesd]",
                                        f"head_path={head}", "timeout_s=120"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning:" in done.stderr and "NaN/Inf weights" in done.stderr and "Traceback" not in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["figures"]["new_tokens"] == 12 and result["compare"]["eesd"]["new_tokens"] == 12
    assert result["acceptance_rate"] == 0 and result["compare"]["eesd"]["acceptance_rate"] == 0


# ---------------------------------------------------------------- SIGTERM of train


def test_sigterm_of_train_is_one_line_and_resumes_bit_equal(tiny_model_dir, tmp_path):
    from tests.test_train import SLOW_STEPS, _tiny_overrides

    prompts = _questions(tmp_path / "p.jsonl", 16)
    # The reference runs in its own process: an in-process run would leave a process group (and DeepSpeed's
    # groups cached on it) and RANK/MASTER_PORT in os.environ for every later test and its subprocesses.
    reference = _run("train", *_tiny_overrides(tiny_model_dir, prompts, tmp_path / "ref", tmp_path / "cache"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference = json.loads(reference.stdout.strip().splitlines()[-1])
    run = tmp_path / "run"
    args = _tiny_overrides(tiny_model_dir, prompts, run, tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, *SLOW_STEPS, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "checkpoints" / "latest").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM): stopped" and proc.returncode == 143, err[-2000:]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    done = _run("train", *args, "resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = lambda folder: [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in lines(run)] == [r["loss"] for r in lines(tmp_path / "ref")]
    resumed = load_head(json.loads(done.stdout.strip().splitlines()[-1])["head_path"]).state_dict()
    for k, v in load_head(reference["head_path"]).state_dict().items():
        assert torch.equal(resumed[k], v), k
