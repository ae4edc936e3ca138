"""mnist-train end to end: every flag checked before anything starts, bad input gives one clear line and
writes nothing; the default recipe is the documented one; 1 real epoch on 30,000 digits serves >= 98%."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.cli import build_parser, main, parse_config
from training.config import ARCH_PRESETS, ENSEMBLE_RECIPE, TrainConfig, describe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def mnist_train(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_clean_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error:"), result.stderr
    for word in words:
        assert word in last


def error_of(capsys, *args):
    """Run main() in-process (no interpreter start-up per case); return the one-line error it exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message
    last = message.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error:"), message
    return last


def test_unknown_arch_in_a_real_process(tmp_path):
    result = mnist_train("--arch", "vgg", "--repo", str(tmp_path / "models"))
    assert_clean_error(result, "invalid choice: 'vgg'")
    assert not (tmp_path / "models").exists()


def test_repo_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file" in error_of(
        capsys, "--repo", str(tmp_path / "file" / "models"), "--train-limit", "100"
    )


def test_bad_model_name(tmp_path, capsys):
    assert "not allowed" in error_of(capsys, "--repo", str(tmp_path / "models"), "--name", "../escape")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_dir(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 60000), ("t10k", 10000)):
        (data / f"{split}-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
        (data / f"{split}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + n.to_bytes(4, "big"))
    assert "not an IDX file" in error_of(capsys, "--data-dir", str(data), "--repo", str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def test_missing_data_dir(tmp_path, capsys):
    line = error_of(capsys, "--data-dir", str(tmp_path / "nope"), "--repo", str(tmp_path / "models"))
    assert "does not exist" in line and "--data-dir" in line


def test_freeze_needs_init_from(tmp_path, capsys):
    assert "--init-from" in error_of(capsys, "--freeze", "features", "--repo", str(tmp_path / "models"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message for machines without a GPU")
def test_cuda_without_a_gpu_fails_before_the_data(tmp_path, capsys):
    line = error_of(capsys, "--device", "cuda", "--data-dir", str(tmp_path / "nope"), "--repo", str(tmp_path))
    assert "no CUDA GPU" in line  # not the missing --data-dir: the device is checked first


def test_resume_from_missing_checkpoint(tmp_path, capsys):
    assert "does not exist" in error_of(
        capsys, "--resume", str(tmp_path / "none.pt"), "--repo", str(tmp_path)
    )


# --- every numeric flag, fed 0, -1, a huge value, infinity and a non-number ------------------------------

VALUES = ("0", "-1", str(10**30), "1e309", "x")
OK, BAD = "accepted", "refused"
NUMERIC_FLAGS = {  # flag: the outcome for each of VALUES
    "--epochs": (BAD, BAD, BAD, BAD, BAD),
    "--batch-size": (BAD, BAD, BAD, BAD, BAD),
    "--lr": (BAD, BAD, BAD, BAD, BAD),
    "--weight-decay": (OK, BAD, BAD, BAD, BAD),
    "--momentum": (OK, BAD, BAD, BAD, BAD),
    "--early-stopping": (OK, BAD, BAD, BAD, BAD),
    "--val-size": (OK, BAD, BAD, BAD, BAD),
    "--label-smoothing": (OK, BAD, BAD, BAD, BAD),
    "--clip-grad": (OK, BAD, OK, BAD, BAD),  # a huge bound is a bound no gradient reaches: no clipping
    "--dropout": (OK, BAD, BAD, BAD, BAD),
    "--seed": (OK, BAD, BAD, BAD, BAD),
    "--seeds": (OK, BAD, BAD, BAD, BAD),
    "--train-limit": (BAD, BAD, BAD, BAD, BAD),
    "--overfit-batch": (OK, BAD, BAD, BAD, BAD),
}
TEXT_FLAGS = {"--data-dir", "--cache-dir", "--repo", "--name", "--checkpoint", "--resume", "--init-from"}
TEXT_FLAGS |= {"--ensemble", "--members"}


def value_flags() -> set[str]:
    """Every flag that takes a value other than a fixed choice, read from the parser itself."""
    return {
        action.option_strings[-1]
        for action in build_parser()._actions
        if action.option_strings and action.nargs != 0 and action.choices is None
    }


def test_every_value_flag_is_in_a_table():
    assert value_flags() == set(NUMERIC_FLAGS) | TEXT_FLAGS


@pytest.mark.parametrize(
    "flag, value, outcome",
    [
        (flag, value, outcome)
        for flag, outcomes in NUMERIC_FLAGS.items()
        for value, outcome in zip(VALUES, outcomes, strict=True)
    ],
)
def test_numeric_flag(flag, value, outcome, tmp_path, capsys):
    argv = [flag, value, "--repo", str(tmp_path / "models")]
    if outcome == OK:
        config, _ = parse_config(argv)
        field = flag[2:].replace("-", "_")
        got = getattr(config.train, field) if hasattr(config.train, field) else getattr(config, field)
        assert got == ((int(value),) if flag == "--seeds" else float(value))
        return
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mnist-train: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert flag in errors[0] and "Traceback" not in err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--hflip"], "--augment"),
        (["--optimizer", "sgd", "--amsgrad"], "--amsgrad"),
        (["--val-size", "0", "--schedule", "plateau"], "--val-size"),
        (["--val-size", "0", "--early-stopping", "2"], "--val-size"),
        (["--freeze", "features"], "--init-from"),
        (["--ensemble", "digits", "--seeds", "3"], "at least 2"),
        (["--ensemble", "digits", "--arch", "cnn2"], "--seeds"),
        (["--ensemble", "digits", "--seed", "3"], "--seeds"),
        (["--ensemble", "digits", "--checkpoint", "c.pt"], "--checkpoint"),
        (["--ensemble", "mnist", "--seeds", "1,2"], "name of its own"),
        (["--seeds", "1,1"], "twice"),
        (["--members", "a:1,b:2"], "--ensemble"),
        (["--ensemble", "e", "--members", "a:1"], "at least 2"),
        (["--ensemble", "e", "--members", "a:0,b"], "positive"),
        (["--ensemble", "e", "--members", "a,a"], "twice"),
        (["--ensemble", "e", "--members", "a,b", "--seeds", "1,2"], "--seeds"),
        (["--ensemble", "e", "--members", "a,b", "--quantize", "int8"], "--quantize"),
        (["--ensemble", "a", "--members", "a:1,a:2"], "name of its own"),
        (["--seeds", "1,2", "--checkpoint", "c.pt"], "--checkpoint"),
    ],
)
def test_conflicting_flags(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--repo", str(tmp_path / "models")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error:") and words in last
    assert not (tmp_path / "models").exists()


# --- the default recipe ---------------------------------------------------------------------------------


def test_default_recipe_is_the_documented_one():
    """benchmarks/training.md spells the default run's settings out; they must be what a bare run uses."""
    text = (ROOT / "benchmarks" / "training.md").read_text()
    (documented,) = re.findall(r"default recipe[^`]*`mnist-train ([^`]+)`", text, flags=re.I)
    (bare,) = parse_config([])[1]
    (spelled_out,) = parse_config(documented.split())[1]
    assert spelled_out == bare
    assert (bare.arch, bare.epochs, bare.schedule, bare.amp) == ("small", 2, "onecycle", True)


def test_help_states_the_best_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, value in ARCH_PRESETS["best"].items():
        assert f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}") in text
    assert "rotation +-10 deg" in text
    (cfg,) = parse_config(["--arch", "best"])[1]
    assert all(getattr(cfg, key) == value for key, value in ARCH_PRESETS["best"].items())


def test_an_explicit_flag_beats_the_arch_preset_a_default_does_not():
    (cfg,) = parse_config(["--arch", "best", "--epochs", "2", "--lr", "0.003"])[1]
    assert (cfg.epochs, cfg.lr, cfg.optimizer) == (2, 0.003, "adamw")


def test_the_ensemble_recipe_trains_its_members_with_the_flags_given(capsys):
    config, trainings = parse_config(
        ["--ensemble", "mix", "--name", "parts", "--epochs", "1", "--train-limit", "500"]
    )
    assert config.trains_recipe and len(trainings) == len(ENSEMBLE_RECIPE) >= 3
    assert len({(t.arch, t.elastic) for t in trainings}) >= 3  # members differ in more than their seed
    for cfg, member in zip(trainings, ENSEMBLE_RECIPE, strict=True):
        assert (cfg.epochs, cfg.train_limit) == (1, 500)  # the flags given, for every member
        assert all(getattr(cfg, key) == value for key, value in member.items() if key != "epochs")
        preset = ARCH_PRESETS.get(member["arch"], {})
        assert all(getattr(cfg, k) == v for k, v in preset.items() if k not in member and k != "epochs")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(describe(member) in text for member in ENSEMBLE_RECIPE)  # the recipe is spelled out in --help


def test_help_explains_no_hflip(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "mirrored digit is another symbol" in " ".join(capsys.readouterr().out.split())


def test_overfit_batch(capsys):
    main(["--arch", "cnn2", "--overfit-batch", "64"])
    assert "train accuracy 1.0000" in capsys.readouterr().out


def test_resume_and_fine_tune(plain_checkpoint, tmp_path, mnist, capsys):
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=1000, val_size=100, schedule="none")
    first = torch.load(plain_checkpoint)  # one epoch of cfg
    resumed = train(replace(cfg, epochs=2), mnist, resume=torch.load(plain_checkpoint), log=lambda *_: None)
    assert resumed.epochs_run == 2 and resumed.history.train_loss[0] == first["history"]["train_loss"][0]
    assert len(resumed.history.train_loss) == 2

    tuned = train(
        replace(cfg, init_from=str(plain_checkpoint), freeze="features"), mnist, log=lambda *_: None
    )
    features = {
        k.removeprefix("features."): v for k, v in first["model"].items() if k.startswith("features.")
    }
    assert features and features.keys() == tuned.model.features.state_dict().keys()
    for name, weight in features.items():
        assert torch.equal(weight, tuned.model.features.state_dict()[name]), name  # frozen
    last = f"classifier.{len(tuned.model.classifier) - 1}.weight"
    assert not torch.equal(first["model"][last], tuned.model.classifier[-1].weight)  # trained

    wrong_arch = error_of(
        capsys, "--arch", "cnn2", "--resume", str(plain_checkpoint), "--repo", str(tmp_path / "m")
    )
    assert "--arch keras" in wrong_arch


def test_a_one_cycle_run_resumes_only_to_its_planned_epochs(tmp_path, mnist, capsys):
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=1000, val_size=100, schedule="onecycle")
    train(cfg, mnist, checkpoint_path=tmp_path / "last.pt", log=lambda *_: None)
    line = error_of(
        capsys,
        "--arch",
        "keras",
        "--epochs",
        "2",
        "--resume",
        str(tmp_path / "last.pt"),
        "--repo",
        str(tmp_path),
    )
    assert "planned for 1 epochs" in line and "--init-from" in line


def test_one_epoch_on_half_of_mnist_serves_98_percent(trained_repo, mnist):
    """The serving tests' model (conftest.py: the default recipe for one epoch on half the training set,
    `--label-smoothing 0`) with its reports, judged on all 10,000 test digits."""
    version = trained_repo / "mnist" / "1"
    for name in (
        "model.onnx",
        "metrics.json",
        "curves.png",
        "confusion.png",
        "misclassified.png",
        "filters.png",
    ):
        assert (version / name).stat().st_size > 0
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": mnist.test_images[:, None]})
    accuracy = float((probs.argmax(1) == mnist.test_labels).mean())
    assert accuracy >= 0.98
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["test_accuracy"] == accuracy  # the exported model's own, not the training device's
    assert metrics["config"]["arch"] == "small" and metrics["config"]["epochs"] == 1
    assert metrics["config"]["train_limit"] == 30_000
    assert session.get_modelmeta().custom_metadata_map["test_accuracy"] == f"{accuracy:.4f}"
    assert np.array(metrics["confusion_matrix"]).sum() == 10_000


# --- checkpoints that do not fit, files that are not checkpoints -----------------------------------------


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, mnist) -> Path:
    """A keras checkpoint trained without batch-norm (the arch's default), a few seconds on 1000 images."""
    path = tmp_path_factory.mktemp("ckpt") / "plain.pt"
    cfg = TrainConfig(arch="keras", epochs=1, train_limit=1000, val_size=100, schedule="none")
    train(cfg, mnist, checkpoint_path=path, log=lambda *_: None)
    return path


@pytest.mark.parametrize("how", ["--init-from", "--resume"])
def test_a_checkpoint_of_other_model_options_is_refused_in_one_line(how, plain_checkpoint, tmp_path, capsys):
    line = error_of(
        capsys, "--arch", "keras", "--batchnorm", "--epochs", "1", "--schedule", "none", how,
        str(plain_checkpoint), "--repo", str(tmp_path / "models"),
    )  # fmt: skip
    assert how in line and "--no-batchnorm" in line and "pass --arch keras --no-batchnorm" in line
    assert not (tmp_path / "models").exists()


def test_resume_needs_the_same_dropout_fine_tuning_does_not(plain_checkpoint, tmp_path, capsys):
    common = ["--arch", "keras", "--epochs", "1", "--schedule", "none", "--dropout", "0.3"]
    line = error_of(capsys, *common, "--resume", str(plain_checkpoint), "--repo", str(tmp_path))
    assert "--dropout 0" in line and "--dropout 0.3" in line
    # Fine-tuning may change what has no weights: the run goes past the checkpoint check to the data.
    line = error_of(
        capsys, *common, "--init-from", str(plain_checkpoint), "--data-dir", str(tmp_path / "none"),
        "--repo", str(tmp_path),
    )  # fmt: skip
    assert "data directory" in line


@pytest.mark.parametrize("how", ["--init-from", "--resume"])
def test_a_file_that_is_no_checkpoint_is_named_as_such_without_unsafe_advice(how, tmp_path, capsys):
    from PIL import Image

    jpeg = tmp_path / "some.jpg"
    Image.new("L", (28, 28)).save(jpeg)
    line = error_of(capsys, how, str(jpeg), "--repo", str(tmp_path / "models"))
    assert f"{jpeg} is not a checkpoint of mnist-train" in line
    assert "weights_only" not in line and "trust" not in line


def test_a_pytorch_file_with_foreign_objects_is_not_unpickled(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"config": argparse.Namespace(arch="cnn2"), "model": {}}, foreign)  # a class, not weights
    line = error_of(capsys, "--init-from", str(foreign), "--repo", str(tmp_path / "models"))
    assert "is not a checkpoint of mnist-train" in line and "objects other than weights" in line
    assert "weights_only" not in line


# --- the repository is checked before training ------------------------------------------------------------


def test_a_model_directory_that_is_a_file_is_reported_before_the_data_is_read(tmp_path, capsys):
    repo = tmp_path / "models"
    repo.mkdir()
    (repo / "mnist").write_text("not a directory")
    line = error_of(capsys, "--repo", str(repo), "--data-dir", str(tmp_path / "no-data"))
    assert f"{repo / 'mnist'} is a file" in line  # not the missing data: the repository comes first
    assert sorted(p.name for p in repo.iterdir()) == ["mnist"]


def test_a_variant_or_ensemble_name_that_cannot_be_written_is_reported_first(tmp_path, capsys):
    repo = tmp_path / "models"
    repo.mkdir()
    (repo / "digits-int8").write_text("")
    line = error_of(
        capsys,
        "--repo",
        str(repo),
        "--name",
        "digits",
        "--quantize",
        "int8",
        "--data-dir",
        str(tmp_path / "x"),
    )
    assert "digits-int8 is a file" in line
    assert sorted(p.name for p in repo.iterdir()) == ["digits-int8"]  # the probe left nothing behind


# --- an interrupted run says what it exported ------------------------------------------------------------


# mnist-train as a terminal runs it in the foreground, where Ctrl-C is SIGINT at its default. This process may
# run with SIGINT ignored, which its children inherit: a script's `pytest ... &` ignores SIGINT and SIGQUIT.
FOREGROUND = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'mnist-train'; runpy.run_module('training.cli', run_name='__main__')"
)


def test_sigint_during_the_second_seed_names_the_first_seeds_export(tmp_path):
    repo = tmp_path / "models"
    command = [sys.executable, "-c", FOREGROUND, "--epochs", "1"]
    command += ["--train-limit", "5000"]  # seed 1 trains long enough for the signal to land in its training
    command += ["--seeds", "0,1", "--repo", str(repo), "--name", "digits"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            if line.startswith("exported: "):  # seed 0 is written; seed 1 starts training now
                # How the process treats signals (ignored, blocked, caught) when sent this one, for a failure.
                status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                masks = [line for line in status if line.startswith("Sig")]
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, (err, masks)
    last = err.strip().splitlines()[-1]
    assert last == f"mnist-train: interrupted; exported before it: {repo / 'digits' / '1'} (seed 0)", err
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "config.pbtxt"]
    assert "exported: " not in rest
