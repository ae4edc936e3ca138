"""mnist-train --quantize int8 --ort-optimize: each variant lands as its own servable model, labelled."""

import onnx
import pytest

from serving.runtime import ModelSession, RuntimeOptions
from training.cli import main


@pytest.mark.slow
@pytest.mark.usefixtures("short_test_split")  # each variant is judged on 1,000 real test digits
def test_variant_flags_export_each_variant_as_its_own_model(tmp_path, capsys, mnist):
    repo = tmp_path / "repo"
    main(["--arch", "cnn2", "--epochs", "1", "--train-limit", "6000", "--repo", str(repo), "--name", "digits",
          "--quantize", "int8", "--ort-optimize"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"exported: {repo / 'digits' / '1'}"  # the contract other tools parse

    images = mnist.test_images[:500, None]
    fp32 = ModelSession(repo / "digits" / "1" / "model.onnx", RuntimeOptions(device="cpu")).run(images)
    for kind in ("int8", "fp32-ort-optimized"):
        assert f"variant {kind}: {repo / f'digits-{kind}' / '1'}" in lines
        model_dir = repo / f"digits-{kind}"
        assert f'name: "digits-{kind}"' in (model_dir / "config.pbtxt").read_text()
        path = model_dir / "1" / "model.onnx"
        metadata = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert metadata["variant"] == kind and metadata["arch"] == "cnn2"
        served = ModelSession(path, RuntimeOptions(device="cpu")).run(images)
        assert (served.argmax(1) == fp32.argmax(1)).mean() >= 0.99
