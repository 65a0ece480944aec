"""ServerSettings: checks, bundle resolution, and the command line, environment and config file it is read from."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmrec.manifest import MANIFEST_FILE, BundleError
from llmrec.server.cli import app as server_app
from llmrec.server.encoding import AsyncEncoder
from llmrec.server.settings import CommandLineSettings, ServerSettings, SettingsError, parse_settings


@pytest.fixture(autouse=True)
def no_llmrec_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the LLMREC_* variables it sets, never the developer's."""
    for name in [name for name in os.environ if name.startswith("LLMREC_")]:
        monkeypatch.delenv(name)


def test_exactly_one_bundle_source():
    with pytest.raises(ValueError, match="exactly one"):
        ServerSettings()
    with pytest.raises(ValueError, match="exactly one"):
        ServerSettings(bundle=Path("a"), bundle_root=Path("b"))


@pytest.mark.parametrize("field, value", [("max_k", 0), ("port", 70000), ("default_session_k", 101),
                                          ("session_idle_timeout_s", 0), ("ort_spinning", "sometimes"),
                                          ("metrics_port", -1), ("max_concurrent_rpcs", 0), ("grace_seconds", -1),
                                          ("log_format", "xml"), ("otlp_endpoint", "collector:4317"),
                                          ("otlp_endpoint", "grpc://collector:4317"), ("drain_seconds", -1),
                                          ("bundle_poll_seconds", -0.5), ("new_item_share", -0.1),
                                          ("new_item_share", 1.5)])
def test_bad_values(field, value):
    with pytest.raises(ValueError):
        ServerSettings(bundle=Path("b"), **{field: value})


def test_defaults():
    settings = ServerSettings(bundle_root=Path("r"))
    assert (settings.max_k, settings.max_request_history, settings.max_text_chars) == (100, 500, 2000)
    assert settings.max_message_bytes == 16 * 2**20 and settings.grace_seconds == 5 and settings.threads >= 1
    assert settings.prefer_gpu and settings.batch_across_requests is None
    # Observability: metrics on at 9090 on the gRPC host, JSON logs, no tracing.
    assert settings.metrics and settings.metrics_port == 9090 and settings.metrics_host is None
    assert settings.log_format == "json" and settings.otlp_endpoint is None
    assert settings.drain_seconds == 0 and settings.bundle_poll_seconds == 30  # drain: opt-in; polling: on
    assert settings.cold_start_map and settings.new_item_share == 0.0


def test_settings_built_in_code_read_neither_environment_nor_argv(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMREC_PORT", "1234")
    monkeypatch.setenv("LLMREC_STATE_DIR", "/somewhere")
    monkeypatch.setattr(sys, "argv", ["pytest", "--port", "4321", "--bogus"])
    settings = ServerSettings(bundle=Path("b"), port=0)
    assert settings.port == 0 and settings.state_dir is None


def test_cpu_only_is_no_prefer_gpu():
    assert not ServerSettings(bundle=Path("b"), cpu_only=True).prefer_gpu
    assert not parse_settings(["--bundle", "b", "--cpu-only", "--prefer-gpu"]).prefer_gpu
    assert not parse_settings(["--bundle", "b", "--no-prefer-gpu"]).prefer_gpu
    assert parse_settings(["--bundle", "b"]).prefer_gpu


def test_flags_used_by_the_makefile_tests_and_bench(tmp_path: Path):
    settings = parse_settings([
        "--bundle-root", str(tmp_path), "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "state"),
        "--cpu-only", "--snapshot-every", "7", "--metrics-port", "9100", "--log-level", "DEBUG",
        "--batch-across-requests", "--max-message-mib", "4", "--session-idle-timeout", "30", "--ort-spinning",
        "never", "--max-queue", "5", "--max-concurrent-rpcs", "64", "--no-verify-hashes", "--no-cold-start-map",
        "--new-item-share", "0.1",
    ])
    assert settings.bundle_root == tmp_path and settings.bundle is None
    assert (settings.host, settings.port, settings.state_dir) == ("0.0.0.0", 0, tmp_path / "state")
    assert not settings.prefer_gpu and settings.snapshot_every == 7 and settings.metrics_port == 9100
    assert settings.log_level == "debug" and settings.batch_across_requests is True
    assert settings.max_message_bytes == 4 * 2**20 and settings.session_idle_timeout_s == 30
    assert (settings.ort_spinning, settings.max_queue, settings.max_concurrent_rpcs) == ("never", 5, 64)
    assert not settings.verify_hashes and not settings.cold_start_map and settings.new_item_share == 0.1
    assert parse_settings(["--bundle", "b", "--no-batch-across-requests"]).batch_across_requests is False
    assert parse_settings(["--bundle", "b"]).encoder_path == "auto"
    assert parse_settings(["--bundle", "b", "--encoder-path", "always"]).encoder_path == "always"


def test_observability_flags_and_variables(monkeypatch: pytest.MonkeyPatch):
    settings = parse_settings(["--bundle", "b", "--no-metrics", "--metrics-host", "0.0.0.0", "--log-format", "TEXT",
                               "--otlp-endpoint", "https://collector.example:4317"])
    assert not settings.metrics and settings.metrics_host == "0.0.0.0" and settings.log_format == "text"
    assert settings.otlp_endpoint == "https://collector.example:4317"
    for name, value in {"BUNDLE": "b", "METRICS": "false", "METRICS_PORT": "0", "LOG_FORMAT": "text",
                        "OTLP_ENDPOINT": "http://127.0.0.1:4317"}.items():
        monkeypatch.setenv(f"LLMREC_{name}", value)
    settings = parse_settings([])
    assert (settings.metrics, settings.metrics_port, settings.log_format) == (False, 0, "text")
    assert settings.otlp_endpoint == "http://127.0.0.1:4317"
    with pytest.raises(SettingsError, match=re.escape("otlp_endpoint (--otlp-endpoint, LLMREC_OTLP_ENDPOINT): "
                                                      "must be a URL like http://otel-collector:4317")):
        parse_settings(["--otlp-endpoint", "otel-collector:4317"])


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name, value in {"BUNDLE": "b", "PORT": "7", "STATE_DIR": str(tmp_path), "PREFER_GPU": "false",
                        "SESSION_IDLE_TIMEOUT": "12", "MAX_MESSAGE_MIB": "2", "BATCH_ACROSS_REQUESTS": "1",
                        "LOG_LEVEL": "warning"}.items():
        monkeypatch.setenv(f"LLMREC_{name}", value)
    settings = parse_settings([])
    assert (settings.bundle, settings.port, settings.state_dir, settings.prefer_gpu) == (Path("b"), 7, tmp_path, False)
    assert settings.session_idle_timeout_s == 12 and settings.max_message_bytes == 2 * 2**20
    assert settings.batch_across_requests is True and settings.log_level == "warning"


def test_config_file(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text('bundle_root = "bundles"\nmax_k = 50\nort_spinning = "always"\nmetrics_port = 9100\n')
    settings = parse_settings(["--config", str(config)])
    assert settings.bundle_root == Path("bundles") and settings.max_k == 50
    assert settings.ort_spinning == "always" and settings.metrics_port == 9100 and settings.config == config


def test_precedence_is_flags_then_environment_then_config_file_then_defaults(monkeypatch, tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text('bundle = "from-file"\nhost = "file"\nport = 1\nmax_k = 50\n')
    monkeypatch.setenv("LLMREC_CONFIG", str(config))
    monkeypatch.setenv("LLMREC_HOST", "env")
    monkeypatch.setenv("LLMREC_PORT", "2")
    settings = parse_settings(["--host", "flag"])
    assert (settings.host, settings.port, settings.max_k, settings.max_queue) == ("flag", 2, 50, 128)
    assert settings.bundle == Path("from-file")
    # The bundle is one choice: a stronger source's bundle_root replaces a weaker source's bundle.
    assert parse_settings(["--bundle-root", "r"]).bundle is None
    monkeypatch.setenv("LLMREC_BUNDLE_ROOT", "env-root")
    assert parse_settings([]).bundle_root == Path("env-root")
    # Named by one source together, the pinned bundle wins (as --bundle always did over --bundle-root).
    assert parse_settings(["--bundle", "b", "--bundle-root", "r"]).bundle == Path("b")


@pytest.mark.parametrize("args, message", [
    (["--bundle", "b", "--port", "70000"], "port (--port, LLMREC_PORT): Input should be less than or equal to 65535"),
    (["--bundle", "b", "--max-k", "0"], "max_k (--max-k, LLMREC_MAX_K): Input should be greater than or equal to 1"),
    (["--bundle", "b", "--ort-spinning", "sometimes"], "Input should be 'during-runs', 'always' or 'never'"),
    (["--bundle", "b", "--encoder-path", "never"], "Input should be 'auto' or 'always'"),
    (["--bundle", "b", "--default-session-k", "200"], "default_session_k (200) must not exceed max_k (100)"),
    ([], "set exactly one of --bundle-root DIR and --bundle DIR"),
])
def test_a_bad_value_is_a_clear_message(args, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        parse_settings(args)


def test_the_server_cli_reports_a_bad_value_without_a_traceback():
    result = CliRunner().invoke(server_app, ["--bundle", "b", "--port", "abc"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == ("llmrec-server: port (--port, LLMREC_PORT): Input should be a valid integer, unable to "
                             "parse string as an integer (got 'abc')\n")
    result = CliRunner().invoke(server_app, ["--bundle", "b", "--no-such-flag"])
    assert result.exit_code == 2 and "unrecognized arguments: --no-such-flag" in result.stderr


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"), ("max_k = ", "config file .*: Invalid value"),
    ('bundle = "b"\nmaxk = 5\n', "unknown setting 'maxk' in the config file"),
])
def test_a_bad_config_file_is_a_clear_message(tmp_path: Path, text, message):
    config = tmp_path / "server.toml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        parse_settings(["--config", str(config)])


def test_help_lists_every_setting_with_its_description(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per setting: argparse would wrap and hyphenate
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for name, field in CommandLineSettings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"--{name.replace('_', '-')}" in help_text and field.description in help_text
        assert f"LLMREC_{name.upper()}" in help_text
    assert "--session-idle-timeout " in help_text and "--no-prefer-gpu" in help_text


def test_server_cli_help_exits_cleanly():
    result = CliRunner().invoke(server_app, ["--help"])
    assert result.exit_code == 0 and "--bundle-root" in result.stdout and "--cpu-only" in result.stdout


def test_bundle_root_resolves_to_the_newest_bundle(tmp_path):
    for version in ("20240101T000000Z", "20250101T000000Z", "20230101T000000Z"):
        (tmp_path / version).mkdir()
        (tmp_path / version / MANIFEST_FILE).write_text("{}")
    (tmp_path / "20990101T000000Z").mkdir()  # no manifest: an unfinished build is never served
    assert ServerSettings(bundle_root=tmp_path).resolve_bundle_dir() == tmp_path / "20250101T000000Z"
    with pytest.raises(BundleError, match="does not exist"):
        ServerSettings(bundle_root=tmp_path / "missing").resolve_bundle_dir()


class _Stub:
    pass


@pytest.mark.parametrize("user, item, widths", [
    (128, 64, [16, 32, 48, 64, 80, 96, 112, 128]),
    (40, 24, [16, 24, 32, 40]),
])
def test_warm_up_covers_every_padded_width(user, item, widths):
    encoder = AsyncEncoder(_Stub(), max_user_tokens=user, max_item_tokens=item)
    try:
        assert encoder.warm_up_widths() == widths
    finally:
        encoder.close()


def test_the_shared_catalogue_store_needs_exactly_one_dsn_source(monkeypatch, tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one of postgres_dsn"):
        ServerSettings(bundle=Path("b"), catalogue_store="postgres")
    with pytest.raises(ValueError, match="exactly one of postgres_dsn"):
        ServerSettings(bundle=Path("b"), catalogue_store="postgres", postgres_dsn="x", postgres_dsn_file=tmp_path)
    with pytest.raises(ValueError, match="only with catalogue_store postgres"):
        ServerSettings(bundle=Path("b"), postgres_dsn="postgresql://db/llmrec")
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://llmrec:s3cret@db/llmrec\n")  # as a mounted Kubernetes Secret, newline and all
    monkeypatch.setenv("LLMREC_CATALOGUE_STORE", "postgres")
    monkeypatch.setenv("LLMREC_POSTGRES_DSN_FILE", str(secret))
    assert parse_settings(["--bundle", "b"]).read_postgres_dsn() == "postgresql://llmrec:s3cret@db/llmrec"
    secret.unlink()
    with pytest.raises(OSError, match="cannot read postgres_dsn_file"):
        parse_settings(["--bundle", "b"]).read_postgres_dsn()


def test_a_bad_dsn_setting_never_echoes_the_dsn():
    with pytest.raises(SettingsError) as error:
        parse_settings(["--bundle", "b", "--postgres-dsn", "postgresql://llmrec:s3cret@db/llmrec"])
    assert "only with catalogue_store postgres" in str(error.value) and "s3cret" not in str(error.value)
