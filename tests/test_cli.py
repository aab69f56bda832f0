"""The console script: every subcommand answers --help, user errors exit 2 without a traceback."""
import subprocess
import sys

import pytest

from prvr.cli import build_parser, main


def _subcommands(parser):
    for action in parser._subparsers._group_actions:  # argparse keeps subparsers here
        for name, sub in action.choices.items():
            yield [name], sub
            if sub._subparsers is not None:
                for rest, subsub in _subcommands(sub):
                    yield [name, *rest], subsub


ALL = [path for path, _ in _subcommands(build_parser())]


def test_expected_commands_exist():
    top = {p[0] for p in ALL}
    assert {"demo", "synth", "encode-text", "data", "train", "evaluate", "index", "registry",
            "stage", "package", "serve", "kube"} <= top


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) for p in ALL])
def test_help_on_every_subcommand(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage: prvr" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prvr.cli", "data", "check", "--data", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert "nope" in res.stderr


def test_bad_override_is_reported(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prvr.cli", "train", "--data", str(tmp_path), "--out",
                          str(tmp_path / "o"), "--set", "train.lr=fast"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "train.lr must be a number" in res.stderr
