"""A non-editable install (`pip install .`) runs from any folder: conf/ ships inside the package (heads/conf)
and the entry points find it there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("heads", "train", "decode", "scripts", "conf", "pyproject.toml", "README.md")


def test_an_installed_copy_finds_its_configs_from_another_folder(tmp_path):
    source, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    for name in SOURCES:  # built from a copy: the build leaves nothing in the checkout
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", str(source), "--no-deps", "--no-build-isolation",
                           "--target", str(target), "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = sorted(p.relative_to(target / "heads" / "conf") for p in (target / "heads" / "conf").rglob("*.yaml"))
    assert installed == sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml"))

    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    where = subprocess.run([sys.executable, "-c", "import heads.cli; print(heads.cli.__file__); print(heads.cli.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(target) and Path(config_dir) == target / "heads" / "conf", where.stderr
    # Hydra composes the installed configs (groups included) without running the job
    shown = subprocess.run([sys.executable, "-m", "train", "data=tiny", "head=transformer", "--cfg", "job"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "max_prompts: 24" in shown.stdout and "type: transformer" in shown.stdout, shown.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == []
