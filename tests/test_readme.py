"""README.md promises exactly two set-up commands; CI must run the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each set-up command is one line"
    main_job, tests = commands
    assert "torch==2.13.0" in main_job and "torch==2.13.0" in tests
    assert ".ci/end-to-end" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = setup_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_end_to_end_script_uses_every_console_command():
    script = (ROOT / ".ci" / "end-to-end").read_text()
    for command in ("mnist-train", "mnist-serve", "mnist-predict", "mnist-bench"):
        assert re.search(rf"^{command} ", script, flags=re.M), command
