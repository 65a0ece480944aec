"""ServerSettings checks and bundle resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec.manifest import MANIFEST_FILE, BundleError
from llmrec.server.encoding import AsyncEncoder
from llmrec.server.settings import ServerSettings


def test_exactly_one_bundle_source():
    with pytest.raises(ValueError, match="exactly one"):
        ServerSettings()
    with pytest.raises(ValueError, match="exactly one"):
        ServerSettings(bundle=Path("a"), bundle_root=Path("b"))


@pytest.mark.parametrize("field, value", [("max_k", 0), ("port", 70000), ("default_session_k", 101),
                                          ("session_idle_timeout_s", 0)])
def test_bad_values(field, value):
    with pytest.raises(ValueError):
        ServerSettings(bundle=Path("b"), **{field: value})


def test_defaults():
    settings = ServerSettings(bundle_root=Path("r"))
    assert (settings.max_k, settings.max_request_history, settings.max_text_chars) == (100, 500, 2000)
    assert settings.max_message_bytes == 16 * 2**20 and settings.grace_seconds == 5 and settings.threads >= 1


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
