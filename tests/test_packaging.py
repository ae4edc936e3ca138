"""A serving-only install (server, client, load tester) needs no PyTorch: the core dependencies leave it
out, and no serving module imports it."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "onnx", "onnxscript")

IMPORT_EVERYTHING_WITHOUT_TORCH = f"""
import importlib, pkgutil, sys
for name in {TRAINING_ONLY!r}:
    sys.modules[name] = None  # `import torch` now raises ImportError, as on a machine without it
import serving
modules = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
for name in modules:
    importlib.import_module(name)
import serving.mnist  # mnist-bench reads the test digits through it
from serving.bench.cli import main
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0
print(len(modules))
"""


def test_every_serving_module_imports_without_pytorch():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING_WITHOUT_TORCH], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) > 20  # the walk really found the package


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def test_core_dependencies_leave_training_to_its_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [
        d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in project["dependencies"]
    ]
    assert not set(names) & set(TRAINING_ONLY), names
    train = {requirement_name(d) for d in project["optional-dependencies"]["train"]}
    assert set(TRAINING_ONLY) <= train
    assert "onnxruntime" not in names and "onnxruntime-gpu" not in names  # exactly one, from cpu or gpu
