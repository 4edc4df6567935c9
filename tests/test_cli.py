"""The ``ablate`` command: one dispatch table, each subcommand's own help, one-line errors.

Also that the ``python -m ablate.X`` forms still work, that the console script is installed, and
that ``ablate --help`` answers without importing torch.
"""

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ablate.cli import COMMANDS, main

SIX = ("study", "figures", "check", "upscale", "moe", "zoo", "plan-memory")  # every command, in order


def ablate_script() -> str:
    """The installed console script: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "ablate"
    found = str(here) if here.exists() else shutil.which("ablate")
    assert found, "no `ablate` console script: run `pip install -e .`"
    return found


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_console_script_is_installed_and_lists_every_command_on_one_line():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ablate"]
    assert script.value == "ablate.cli:main"
    done = run([ablate_script(), "--help"], env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert tuple(COMMANDS) == SIX
    for name in SIX:
        (line,) = [line for line in lines if line.split()[:1] == [name]]  # exactly one line each
        assert COMMANDS[name][1] in line  # the summary is on the command's own line


@pytest.mark.parametrize("name", SIX)
def test_subcommand_help_names_the_cli(name, capsys):
    assert exit_code([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: ablate {name} ")


def test_ablate_upscale_help_runs_as_a_command():
    done = run([ablate_script(), "upscale", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ablate upscale ") and "--max-shard-size" in done.stdout
    assert "example: ablate upscale ./mistral-7b --plan 'llama_pro(8)'" in done.stdout
    assert "--plan PLAN" in done.stdout and "--m M" in done.stdout


@pytest.mark.parametrize("module", ["ablate.upscale", "ablate.moe"])
def test_python_m_forms_keep_their_prog(module):
    done = run([sys.executable, "-m", module, "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module} ")
    assert f"example: python -m {module} ./mistral-7b" in done.stdout


def test_python_m_ablate_is_the_cli():
    done = run([sys.executable, "-m", "ablate", "--help"])
    assert done.returncode == 0, done.stderr
    assert "usage: ablate " in done.stdout and all(name in done.stdout for name in SIX)


@pytest.mark.parametrize("argv", [["no-such"], [], ["--trials", "3"]], ids=["unknown", "none", "option-first"])
def test_unknown_or_missing_command_is_one_line_and_exit_2(argv):
    done = run([ablate_script(), *argv])
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "study, figures, check, upscale, moe, zoo" in line


def test_arguments_reach_the_subcommand(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert exit_code(["upscale", str(missing), "--m", "1", "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and not (tmp_path / "out").exists()


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom ablate.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'optuna', 'lm_eval', 'datasets') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    done = run([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []")


class _Writes:
    """A stderr that keeps each write call apart, as an unbuffered pipe does."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("raised, expected", [(None, "error: bad input here\n"), (KeyboardInterrupt, "interrupted\n")])
def test_the_error_line_is_one_write_so_ranks_cannot_interleave_it(raised, expected, monkeypatch):
    """Under PYTHONUNBUFFERED=1 each write is a write(2); torchrun's ranks share one pipe, and a
    line written as text then newline came out as two ranks' errors on one line (CI, stop 23)."""
    from ablate.errors import UserError, cli

    def main():
        raise raised() if raised else UserError("bad   input\nhere")

    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit):
        cli(main)()
    assert stderr.calls == [expected]
