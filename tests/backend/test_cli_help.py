"""Every sub-command's --help prints and exits 0 (argparse formats help lazily, so a bad string only shows here)."""

import pytest

from road_sslkd import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser(command).parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: road-sslkd {command}" in capsys.readouterr().out
