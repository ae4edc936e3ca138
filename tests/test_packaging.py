"""What each install holds. A serving-only install (the server and the clients: `.[cpu]` or `.[gpu]`, e.g. a
server container or a client machine) has no PyTorch, matplotlib or tqdm, neither among its dependencies
nor among its imports; training and the load tester get them from their extras. constraints.txt (written
by .ci/lock) pins every package CI and the container images install, at versions pyproject.toml admits."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"
TRAINING_ONLY = ("torch", "onnx", "onnxscript")
NOT_FOR_SERVING = (*TRAINING_ONLY, "matplotlib", "tqdm")

IMPORT_WITHOUT = """
import importlib, pkgutil, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import {blocked[0]}` now raises ImportError, as on a machine without it
import serving
modules = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
modules = [m for m in modules if {select}]
for name in modules:
    importlib.import_module(name)
{then}
print(len(modules))
"""
SERVER_AND_CLIENTS = IMPORT_WITHOUT.format(
    blocked=NOT_FOR_SERVING, select="not m.startswith('serving.bench')", then=""
)
BENCH = IMPORT_WITHOUT.format(
    blocked=NOT_FOR_SERVING,
    select="m.startswith('serving.bench')",
    then="""from serving.bench.cli import main
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0""",
)


def import_modules(script: str) -> int:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_server_and_clients_import_without_pytorch_matplotlib_or_tqdm():
    assert import_modules(SERVER_AND_CLIENTS) > 15  # the walk really found the package


def test_the_load_tester_runs_without_pytorch_and_without_its_plot_and_progress_bar():
    assert import_modules(BENCH) >= 5


def closure(requirements: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution an install of these requirements brings in, from the installed packages' own
    metadata (this environment holds all of them: the test command installs every extra that matters)."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in requirements]
    while todo:
        requirement, active = todo.pop()
        markers = [{"extra": e} for e in active or [""]]
        if requirement.marker and not any(requirement.marker.evaluate(m) for m in markers):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        todo += [(Requirement(r), frozenset(requirement.extras)) for r in dist.requires or []]
    return seen


def extra(name: str) -> list[str]:
    return PROJECT["optional-dependencies"][name]


def test_a_serving_install_leaves_out_training_plotting_and_progress_bars():
    serving = closure(PROJECT["dependencies"] + extra("cpu"))
    assert {"numpy", "grpcio", "onnxruntime", "pillow"} <= serving  # the walk follows the dependencies
    assert not serving & set(NOT_FOR_SERVING), sorted(serving & set(NOT_FOR_SERVING))
    # ...and the commands that need them still get them.
    assert set(NOT_FOR_SERVING) <= closure(extra("train"))
    assert {"matplotlib", "tqdm"} <= closure(extra("bench"))
    assert "pytest" not in closure(PROJECT["dependencies"] + extra("train") + extra("bench"))


def pins() -> dict[str, str]:
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[^=\s]+", line) for line in lines), "name==version lines only"
    names = [line.split("==")[0] for line in lines]
    assert len(names) == len(set(names)) and names == sorted(names)
    return dict(line.split("==") for line in lines)


def test_constraints_pin_everything_ci_and_the_images_install():
    locked = pins()
    ci = closure(PROJECT["dependencies"] + extra("cpu") + extra("train") + extra("test") + extra("bench"))
    assert not ci - set(locked), f"run .ci/lock: {sorted(ci - set(locked))} unpinned"
    # The CUDA image's packages are not installed here: their pins come from the lock's own resolution.
    assert {"onnxruntime-gpu", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= set(locked)
    # Every pin is a version pyproject.toml admits.
    for requirement in map(
        Requirement, PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), [])
    ):
        name = canonicalize_name(requirement.name)
        if name in locked:
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                str(requirement),
                locked[name],
            )


def test_core_dependencies_leave_training_plotting_and_onnxruntime_to_extras():
    names = {canonicalize_name(Requirement(d).name) for d in PROJECT["dependencies"]}
    assert not names & set(NOT_FOR_SERVING), names
    assert set(TRAINING_ONLY) <= {canonicalize_name(Requirement(d).name) for d in extra("train")}
    assert "onnxruntime" not in names and "onnxruntime-gpu" not in names  # exactly one, from cpu or gpu
