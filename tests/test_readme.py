"""The README's commands parse with each file's own Args, so the README cannot drift from the flags."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

import common

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
METHODS = ("tscam", "scm", "sat", "bas", "dawsol")
# every `python <method>.py ...` in a code span or a shell block line (comments after '#' dropped)
PATTERN = r"python (?:" + "|".join(METHODS) + r")\.py[^`\n|]*"
COMMANDS = sorted({m.group(0).split("#")[0].strip() for m in re.finditer(PATTERN, README)})


def test_readme_has_no_unfilled_placeholders():
    assert not re.findall(r"@[A-Z_a-z]+@", README)


def test_every_method_has_a_measured_synthetic_row():
    """The seed table (benchmarks/seeds.py's output) has a row per method, and the command above it runs each one."""
    section = README.split("### Seed statistics", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for method, name in zip(METHODS, ("TS-CAM", "SCM", "SAT", "BAS", "DA-WSOL"), strict=True):
        assert f'--config {method}="{method}.py"' in section, method
        assert any(row.startswith(f"| {name} ") for row in rows), name


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses_with_the_files_args(command):
    argv = shlex.split(command)
    module = importlib.import_module(Path(argv[1]).stem)
    args = common.parse_args(module.Args, argv[2:])  # an unknown flag or a bad value exits here
    assert isinstance(args, module.Args)


def test_line_counts_in_the_methods_table_are_current():
    root = Path(__file__).resolve().parent.parent
    for method in METHODS:
        lines = len((root / f"{method}.py").read_text().splitlines())
        row = next(line for line in README.splitlines() if line.startswith(f"| [`{method}.py`]"))
        assert f"| {lines} |" in row, (method, lines)
