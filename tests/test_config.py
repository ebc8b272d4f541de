"""Configuration: one TOML file, environment overrides, errors that say where and what."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ciserver import config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "ciserver.example.toml"


def test_defaults_work_without_a_file(tmp_path: Path) -> None:
    cfg = config.load(None, {"XDG_STATE_HOME": str(tmp_path)})
    assert cfg.smtp.listen == "127.0.0.1:2525"
    assert cfg.web.listen == "127.0.0.1:8080"
    assert cfg.database_url == f"sqlite+aiosqlite:///{tmp_path / 'ciserver' / 'ciserver.db'}"
    assert cfg.base_url == "http://127.0.0.1:8080"


def test_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    cfg = config.load(None, {"CISERVER_SERVER__STATE_DIR": str(tmp_path / "state")})
    first = cfg.secret()
    assert len(first) >= 32
    assert (tmp_path / "state" / "secret_key").stat().st_mode & 0o777 == 0o600
    again = config.load(None, {"CISERVER_SERVER__STATE_DIR": str(tmp_path / "state")})
    assert again.secret() == first


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\ndomain = "invites.example.com"\n[smtp]\nmax_message_size = 100\n'
                    '[organizers]\nallow = ["zach@team.example", "*@nba.example"]\n'
                    '[relay]\nsmarthost = "smtp.example.com:587"\ntls = "implicit"\n')
    cfg = config.load(path, {"CISERVER_SMTP__MAX_MESSAGE_SIZE": "2048",
                             "CISERVER_WEB__TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2",
                             "CISERVER_DATABASE__ECHO": "false"})
    assert cfg.server.domain == "invites.example.com"
    assert cfg.smtp.max_message_size == 2048  # the environment wins
    assert cfg.organizers.allow == ["zach@team.example", "*@nba.example"]
    assert cfg.relay.tls == "implicit"
    assert cfg.web.trusted_proxies == ["10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize(("text", "env", "expected"), [
    ('[smtp]\nmax_message_size = "big"\n', {},
     "[smtp] max_message_size: expected an integer, got 'big'"),
    ('[relay]\ntls = "ssl"\n', {}, '[relay] tls: expected "none" | "starttls" | "implicit"'),
    ('[smtp]\nlisten = "localhost"\n', {}, '[smtp] listen: expected "host:port"'),
    ('[server]\ndomian = "x"\n', {}, "[server] domian: unknown key"),
    ('[sever]\n', {}, "[sever]: unknown section"),
    ('[organizers]\nallow = ["nobody"]\n', {}, "[organizers] allow[0]: expected"),
    ('[database]\nurl = "mysql://x"\n', {}, "[database] url: expected"),
    ("", {"CISERVER_SMTP__MAX_RECIPIENTS": "many"},
     "environment CISERVER_SMTP__MAX_RECIPIENTS: [smtp] max_recipients: expected an integer"),
])
def test_errors_name_file_section_key_and_form(tmp_path: Path, text: str, env: dict[str, str],
                                               expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path, env)
    message = str(info.value)
    assert expected in message
    if not env:
        assert str(path) in message


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(path, {})
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml", {})


def test_example_documents_every_key_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for section, key, default, help_text in config.describe():
        assert section in data, f"[{section}] missing from the example"
        assert key in data[section], f"[{section}] {key} missing from the example"
        assert data[section][key] == default, f"[{section}] {key}: example shows another default"
        assert help_text.split(";")[0][:40] in text.replace("\n# ", " "), f"{key}: no help"
    # and the example itself loads
    config.load(EXAMPLE, {})


@pytest.mark.parametrize(("key", "value", "says"), [
    ("CISERVER_SERVER__DOMAIN", "not a domain!", "[server] domain"),
    ("CISERVER_SERVER__DOMAIN", "-bad.example", "[server] domain"),
    ("CISERVER_SERVER__CREATE_LOCAL_PART", "bad local@", "[server] create_local_part"),
])
def test_values_that_cannot_work_are_refused(key: str, value: str, says: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(None, {key: value})
    assert says in str(err.value)


def test_values_that_work_pass() -> None:
    cfg = config.load(None, {"CISERVER_SERVER__DOMAIN": "Invites.Example.com",
                                 "CISERVER_SERVER__CREATE_LOCAL_PART": "new-event",
                                 "CISERVER_SERVER__SECRET_KEY": "s" * 16})
    assert cfg.server.domain == "Invites.Example.com"
    assert config.load(None, {}).server.domain == "localhost"
