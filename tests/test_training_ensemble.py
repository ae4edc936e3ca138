"""mnist-train --ensemble: the recipe's members, trained briefly, become one served model that averages them.

mnist-train runs in this process on real MNIST with the test split cut to its first 1,000 digits
(conftest.py, short_test_split): these tests are about how members combine, not about accuracy.
"""

import io
import json
import shutil
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from serving.contract import INPUT_NAME, OUTPUT_NAME
from serving.mnist import MNIST
from serving.runtime import ModelSession, RuntimeOptions
from training.cli import main
from training.config import ENSEMBLE_RECIPE
from training.ensemble import load_member
from training.export import PARITY_TOL, reference_probabilities, versions

N = len(ENSEMBLE_RECIPE)
MEMBERS = tuple(range(1, N + 1))
pytestmark = pytest.mark.usefixtures("short_test_split")  # mnist-train here sees 1,000 test digits


@pytest.fixture(scope="module")
def digits(short_test_split: MNIST) -> MNIST:
    """The MNIST that mnist-train sees here: the members' and the ensembles' test digits."""
    return short_test_split


def run_recipe(root: Path) -> None:
    """--ensemble alone: the recipe's members (small here: 1 epoch on 200 images) as digits:1..N, and their
    ensemble `pair`, in one command, into root/repo; the lines it printed into root/printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        main(["--ensemble", "pair", "--name", "digits", "--epochs", "1", "--train-limit", "200",
              "--repo", str(root / "repo")])  # fmt: skip
    (root / "printed").write_text(out.getvalue())


@pytest.fixture(scope="module")
def recipe_run(built_once, short_test_split: MNIST) -> tuple[Path, list[str]]:
    """The recipe's repository (read-only) and the lines it printed, trained once for the whole run."""
    root = built_once("ensemble-recipe", run_recipe)
    return root / "repo", (root / "printed").read_text().strip().splitlines()


@pytest.fixture(scope="module")
def ensemble_repo(recipe_run: tuple[Path, list[str]]) -> Path:
    return recipe_run[0]


@pytest.fixture
def own_repo(ensemble_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the recipe's repository, for a test that writes into it."""
    return Path(shutil.copytree(ensemble_repo, tmp_path / "repo"))


def run_main(capsys, *argv: str) -> list[str]:
    main(list(argv))
    return capsys.readouterr().out.strip().splitlines()


def served(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities as the server computes them; ModelSession refuses a model that breaks the contract."""
    return ModelSession(path, RuntimeOptions(device="cpu")).run(images[:, None])


@pytest.fixture(scope="module")
def on_test_set(digits):
    """ONNX Runtime's probabilities on the (short) test split, computed once per model file."""

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        images = digits.test_images[:, None]
        return np.concatenate(
            [session.run(None, {INPUT_NAME: images[i : i + 500]})[0] for i in range(0, len(images), 500)]
        )

    return cache(run)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_members_are_exported_and_the_ensemble_keeps_the_contract(ensemble_repo, mnist):
    repo = ensemble_repo
    for name in ("digits/1", "digits/2", "pair/1"):
        assert (repo / name / "model.onnx").is_file()
    assert (repo / "digits" / "1" / "checkpoint.pt").is_file()
    graph = onnx.load(repo / "pair" / "1" / "model.onnx").graph
    (inp,), (out,) = graph.input, graph.output
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 1, 28, 28]
    assert out.name == OUTPUT_NAME and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    probs = served(repo / "pair" / "1" / "model.onnx", mnist.test_images[:7])
    assert probs.shape == (7, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_ensemble_is_the_mean_of_its_members(ensemble_repo, digits, on_test_set):
    repo = ensemble_repo
    members = [load_member(repo, "digits", version) for version in MEMBERS]
    images = digits.test_images[:250]  # PyTorch on five members: a quarter of the split says as much
    expected = np.mean([reference_probabilities(m.net, images) for m in members], axis=0)
    got = on_test_set(repo / "pair" / "1" / "model.onnx")[: len(images)]
    assert np.abs(got - expected).max() <= PARITY_TOL
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_metadata_lists_members_and_true_accuracies(ensemble_repo, digits, on_test_set):
    def accuracy_of(path: Path) -> float:
        return float((on_test_set(path).argmax(1) == digits.test_labels).mean())

    repo = ensemble_repo
    meta = metadata(repo / "pair" / "1" / "model.onnx")
    members = json.loads(meta["members"])
    assert [m["model"] for m in members] == [f"digits:{v}" for v in MEMBERS]
    assert [m["arch"] for m in members] == [recipe["arch"] for recipe in ENSEMBLE_RECIPE]
    assert meta["arch"] == "ensemble"
    member_accuracies = []
    for m, version in zip(members, MEMBERS, strict=True):
        path = repo / "digits" / str(version) / "model.onnx"
        accuracy = accuracy_of(path)
        assert m["test_accuracy"] == pytest.approx(accuracy, abs=5e-5)
        assert metadata(path)["test_accuracy"] == f"{accuracy:.4f}"
        member_accuracies.append(accuracy)
    ensemble_accuracy = accuracy_of(repo / "pair" / "1" / "model.onnx")
    assert meta["test_accuracy"] == f"{ensemble_accuracy:.4f}"
    assert ensemble_accuracy >= min(member_accuracies)
    assert json.loads((repo / "pair" / "1" / "metrics.json").read_text())["members"] == members
    for picture in ("confusion.png", "misclassified.png"):  # the digits the ensemble still misses
        assert (repo / "pair" / "1" / picture).stat().st_size > 0


def test_members_from_the_repository_are_averaged_and_a_bare_name_is_its_latest(own_repo, on_test_set,
                                                                                 capsys):  # fmt: skip
    repo = own_repo
    last = MEMBERS[-1]
    listed = f"digits:{last - 1},digits"
    lines = run_main(capsys, "--repo", str(repo), "--ensemble", "pair", "--members", listed)
    assert lines[-1] == f"exported: {repo / 'pair' / '2'}"
    members = json.loads(metadata(repo / "pair" / "2" / "model.onnx")["members"])
    assert [m["model"] for m in members] == [f"digits:{last - 1}", f"digits:{last}"]
    each = [on_test_set(repo / "digits" / str(v) / "model.onnx") for v in (last - 1, last)]
    expected = np.mean(each, axis=0)
    got = on_test_set(repo / "pair" / "2" / "model.onnx")
    # The members' own graphs, composed: what they serve, averaged, up to float32 rounding.
    assert np.abs(got - expected).max() <= 1e-6 and (got.argmax(1) == expected.argmax(1)).all()


def test_members_exported_for_other_opsets_are_refused_in_one_line(own_repo):
    repo = own_repo
    path = repo / "digits" / "2" / "model.onnx"
    model = onnx.load(path)
    (default,) = [o for o in model.opset_import if o.domain == ""]
    default.version -= 1  # as an export by another exporter version would be
    onnx.save(model, path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(repo), "--ensemble", "another", "--members", "digits:1,digits:2"])
    assert "different opsets" in exit_info.value.code and "\n" not in exit_info.value.code
    assert not (repo / "another").exists()


@pytest.mark.parametrize(
    "members, words",
    [
        ("digits:1,digits:7", "no version 7"),
        ("digits,nothing", "no model 'nothing'"),
        ("digits,pair", "checkpoint"),
    ],
)
def test_bad_member_is_refused_before_anything_is_written(own_repo, capsys, members, words):
    repo = own_repo
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(repo), "--ensemble", "another", "--members", members])
    assert isinstance(exit_info.value.code, str) and exit_info.value.code.startswith("mnist-train: error:")
    assert words in exit_info.value.code and "\n" not in exit_info.value.code
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def test_the_ensemble_recipe_is_one_command(recipe_run):
    repo, lines = recipe_run
    assert versions(repo / "digits") == list(MEMBERS)
    assert lines[-1] == f"exported: {repo / 'pair' / '1'}"
    for version, recipe in zip(MEMBERS, ENSEMBLE_RECIPE, strict=True):
        config = json.loads((repo / "digits" / str(version) / "metrics.json").read_text())["config"]
        assert config["epochs"] == 1 and config["train_limit"] == 200
        assert all(config[key] == value for key, value in recipe.items() if key != "epochs")
