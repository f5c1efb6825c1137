"""The command line's defaults and usage errors, without running anything."""

from __future__ import annotations

import pytest

from runner.cli import build_parser, main


def test_git_credentials_come_from_systemd_when_it_provides_them(monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/sandgate.service")
    args = build_parser().parse_args(["run", "--", "true"])
    assert args.credentials == "/run/credentials/sandgate.service"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    args = build_parser().parse_args(["run", "--", "true"])
    assert args.credentials == "/etc/sandgate/credentials"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--resolve", "nohost", "--", "true"], "HOST=ADDR"),
        (["run", "--resolve", "a.test=not-an-ip", "--", "true"], "bad --resolve"),
        (["run", "--memory", "lots", "--", "true"], "--memory"),
        (["run", "--timeout", "-3", "--", "true"], "bad duration"),
        (["run", "--pids", "0", "--", "true"], "bad number"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
