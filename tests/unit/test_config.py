"""Configuration: defaults, secrets, and one clear line per kind of error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_daemon import config
from cxr_daemon.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cxrd.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    """Only the bucket is required; everything else has the documented default."""
    cfg = config.load(write(tmp_path, '[s3]\nbucket = "b"\n'))
    assert cfg.s3.bucket == "b"
    assert cfg.orthanc.url == "http://127.0.0.1:8042"
    assert cfg.orthanc.page_size == 100
    assert cfg.filter.modalities == ("CR", "DX")
    assert cfg.pipeline.retry_backoff_s == (5, 30, 120, 600, 1800)
    assert cfg.database.url.startswith("sqlite://")
    assert cfg.report.backend == "template"


def test_example_config_is_valid_and_documents_every_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.example.toml loads, and every key of every section appears in it."""
    monkeypatch.setenv("CXRD_ORTHANC_PASSWORD", "x")
    monkeypatch.setenv("CXRD_DB_PASSWORD", "y")
    example = REPO / "config.example.toml"
    cfg = config.load(example)
    text = example.read_text()
    for section, cls in config.SECTIONS.items():
        assert f"[{section}]" in text
        for name in cls.__dataclass_fields__:
            if name != "password":
                assert f"\n{name} =" in text or f"\n# {name} =" in text, f"{section}.{name}"
    assert cfg.orthanc.password == "x"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    """A misspelt key stops cxrd naming section.key and the known keys."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[orthanc]\npoll_intervall_s = 2\n'))
    assert "orthanc.poll_intervall_s: unknown key" in message
    assert "poll_interval_s" in message


def test_unknown_section(tmp_path: Path) -> None:
    """An unknown section is named."""
    assert "[orthank]: unknown section" in error_of(write(tmp_path, "[orthank]\nurl = 'x'\n"))


def test_wrong_type_names_expected_type(tmp_path: Path) -> None:
    """A string where a number belongs says what was expected and what was found."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[orthanc]\ntimeout_s = "30"\n'))
    assert "orthanc.timeout_s: expected a number, got '30'" in message


def test_wrong_list_item_type(tmp_path: Path) -> None:
    """A list of the wrong item type is rejected."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[filter]\nmodalities = "DX"\n'))
    assert "filter.modalities: expected a list of strings" in message


def test_boolean_is_not_an_integer(tmp_path: Path) -> None:
    """true is not accepted as a count."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[pipeline]\nworkers = true\n'))
    assert "pipeline.workers: expected an integer" in message


def test_missing_required_value(tmp_path: Path) -> None:
    """No [s3] bucket stops cxrd naming s3.bucket."""
    assert "s3.bucket: required" in error_of(write(tmp_path, "[orthanc]\npage_size = 10\n"))


def test_bad_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    """An unsupported backend lists what is supported."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[inference]\nbackend = "onnx"\n'))
    assert "inference.backend: expected one of 'sagemaker', 'http'" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    """A page size of 0 is rejected with the minimum."""
    message = error_of(write(tmp_path, '[s3]\nbucket = "b"\n[orthanc]\npage_size = 0\n'))
    assert "orthanc.page_size: expected at least 1" in message


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """password_env names the variable the password is read from."""
    monkeypatch.setenv("MY_PW", "s3cret")
    cfg = config.load(write(tmp_path, '[s3]\nbucket = "b"\n[database]\npassword_env = "MY_PW"\n'))
    assert cfg.database.password == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_unset_secret_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password_env naming an unset variable is an error naming the variable."""
    monkeypatch.delenv("NOPE_PW", raising=False)
    path = write(tmp_path, '[s3]\nbucket = "b"\n[orthanc]\npassword_env = "NOPE_PW"\n')
    assert "orthanc.password_env: expected environment variable NOPE_PW" in error_of(path)


def test_toml_syntax_error(tmp_path: Path) -> None:
    """Broken TOML is reported with the file name."""
    assert "not valid TOML" in error_of(write(tmp_path, "[s3\nbucket = \n"))


def test_missing_file(tmp_path: Path) -> None:
    """A missing file says how to point cxrd at one."""
    assert "no such file" in error_of(tmp_path / "absent.toml")


def test_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over $CXRD_CONFIG, which wins over /etc/cxrd/config.toml."""
    monkeypatch.setenv("CXRD_CONFIG", str(tmp_path / "env.toml"))
    assert config.config_path(tmp_path / "flag.toml") == tmp_path / "flag.toml"
    assert config.config_path(None) == tmp_path / "env.toml"
    monkeypatch.delenv("CXRD_CONFIG")
    assert config.config_path(None) == Path("/etc/cxrd/config.toml")
