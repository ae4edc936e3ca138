"""mnist-predict over files a user has: every file-level problem is that file's error line (and, with --json,
its record), the other files are still classified, in order; a problem of the whole run is said once.

The served model is the ridge-regression classifier of tests/helpers.py (no training run needed), in a real
server on loopback; mnist-predict runs in this process (its `main`), as the console command would.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import client
from serving.channels import MAX_MESSAGE_BYTES

from helpers import fitted_repo


@pytest.fixture(scope="module")
def linear_repo(tmp_path_factory, mnist) -> Path:
    return fitted_repo(tmp_path_factory.mktemp("predict-repo"), mnist)


def digit(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def predict(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of one mnist-predict run."""
    with pytest.raises(SystemExit) as exit_info:
        client.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out.splitlines(), err.splitlines()


def test_each_file_level_problem_is_that_files_error_and_the_others_are_classified(
    start_server, linear_repo, mnist, tmp_path, capsys
):
    running = start_server(linear_repo)
    first = digit(tmp_path / "a.png", mnist.test_images[0])
    huge = tmp_path / "b-huge.jpg"  # over the client's own message limit: never sent
    huge.write_bytes(b"\xff" * (MAX_MESSAGE_BYTES + 1))
    large = tmp_path / "c-large.png"  # within the message limit, above the server's --max-image-bytes
    large.write_bytes(b"\x89PNG" + bytes(6_000_000))
    garbage = tmp_path / "d-garbage.png"
    garbage.write_bytes(b"not an image")
    missing = tmp_path / "e-missing.png"
    last = digit(tmp_path / "f.png", mnist.test_images[1])
    files = [first, huge, large, garbage, missing, last]

    code, rows, errors = predict(capsys, *map(str, files), "--server", running.target)

    assert code == 1
    assert [row.split("\t")[:2] for row in rows] == [
        [str(first), str(mnist.test_labels[0])],
        [str(last), str(mnist.test_labels[1])],
    ]
    assert errors[0] == (
        f"mnist-predict: error: {huge}: {MAX_MESSAGE_BYTES + 1:,} bytes, above this client's message limit "
        f"of {MAX_MESSAGE_BYTES:,} bytes; not sent"
    )
    assert errors[1].startswith(f"mnist-predict: error: {large}: RESOURCE_EXHAUSTED: ")
    assert errors[2].startswith(f"mnist-predict: error: {garbage}: INVALID_ARGUMENT: ")
    assert errors[3] == f"mnist-predict: error: {missing}: cannot read: No such file or directory"
    assert len(errors) == 4


def test_a_file_over_the_servers_message_limit_is_its_own_error(
    start_server, linear_repo, mnist, tmp_path, capsys
):
    """The server refuses the message and so ends the whole stream; the file that caused it is named and
    the files after it are still classified."""
    running = start_server(linear_repo, max_message_bytes=1_000_000)
    first = digit(tmp_path / "a.png", mnist.test_images[0])
    big = tmp_path / "b.png"
    big.write_bytes(bytes(2_000_000))
    rest = [digit(tmp_path / f"c{k}.png", mnist.test_images[k]) for k in range(2, 6)]

    code, rows, errors = predict(capsys, *map(str, [first, big, *rest]), "--server", running.target)

    assert code == 1
    assert [row.split("\t")[0] for row in rows] == [str(p) for p in (first, *rest)]
    (error,) = errors
    assert (
        error.startswith(f"mnist-predict: error: {big}: RESOURCE_EXHAUSTED: ") and "larger than max" in error
    )


def test_an_unknown_model_over_a_directory_is_said_once(start_server, linear_repo, mnist, tmp_path, capsys):
    running = start_server(linear_repo)
    for k in range(4):
        digit(tmp_path / f"{k}.png", mnist.test_images[k])

    code, rows, errors = predict(capsys, str(tmp_path), "--server", running.target, "--model", "nosuch")

    assert code == 1 and rows == []
    (error,) = errors
    assert error.startswith(f"mnist-predict: error: server {running.target} answered NOT_FOUND: ")
    assert "nosuch" in error


def test_json_writes_a_record_for_every_file(start_server, linear_repo, mnist, tmp_path, capsys):
    running = start_server(linear_repo)
    good = digit(tmp_path / "a.png", mnist.test_images[0])
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    missing = tmp_path / "c.png"

    code, rows, errors = predict(
        capsys, str(good), str(bad), str(missing), "--server", running.target, "--json"
    )

    assert code == 1 and len(errors) == 2
    records = [json.loads(row) for row in rows]
    assert [r["path"] for r in records] == [str(good), str(bad), str(missing)]
    assert records[0]["label"] == mnist.test_labels[0] and "error" not in records[0]
    assert (
        records[1]["error"]["code"] == "INVALID_ARGUMENT"
        and "cannot identify" in records[1]["error"]["message"]
    )
    assert records[2]["error"] == {"code": "UNREADABLE", "message": "cannot read: No such file or directory"}


def test_the_token_file_flag_is_spelt_as_the_servers(start_server, linear_repo, mnist, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    running = start_server(linear_repo, auth_token_file=token)
    image = str(digit(tmp_path / "a.png", mnist.test_images[0]))

    code, rows, _ = predict(capsys, image, "--server", running.target, "--auth-token-file", str(token))
    assert code == 0 and len(rows) == 1
    code, rows, _ = predict(capsys, image, "--server", running.target, "--token-file", str(token))
    assert code == 0 and len(rows) == 1  # the former name still works

    empty = tmp_path / "empty"
    empty.write_text("  \n")
    code, rows, errors = predict(capsys, image, "--server", running.target, "--auth-token-file", str(empty))
    assert code == 2 and errors == [f"mnist-predict: error: token file {empty} is empty"]
    assert "--auth-token-file" in client.build_parser().format_help()
    assert "--token-file" not in client.build_parser().format_help()
