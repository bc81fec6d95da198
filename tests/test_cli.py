"""The command line: every subcommand has --help, and dispatch reaches the module's run_cli."""

import subprocess
import sys

import pytest

from robustcompress.cli import SUBCOMMANDS, main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "robustcompress", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout


def test_cli_modules_do_not_import_the_report_cli_into_reporting():
    import robustcompress.reporting as reporting

    assert not hasattr(reporting, "run_cli") and not hasattr(reporting, "add_arguments")
