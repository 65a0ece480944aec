"""LoadedBundle against the real tiny bundle, and the bundles it must refuse."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec import manifest as mf
from llmrec.template import TEMPLATE_VERSION
from llmrec.server.bundle import LoadedBundle


def test_loads_the_tiny_bundle(tiny_bundle, tiny_catalogue):
    ef_search = mf.read_manifest(tiny_bundle, verify_hashes=False).index.ef_search
    bundle = LoadedBundle.load(tiny_bundle, prefer_gpu=False, min_ef=ef_search + 50)
    assert bundle.item_ids == [item_id for item_id, _ in tiny_catalogue]
    assert bundle.items[0] == tiny_catalogue[0][1]
    assert bundle.precision == "int8" and bundle.encoder.provider == "CPUExecutionProvider"
    assert bundle.index.ef == ef_search + 50  # raised to max_k so that ef >= k for every allowed k
    assert bundle.index.get_current_count() == 42
    assert bundle.vectors.shape == (42, bundle.manifest.dimension + 1)
    # The index was loaded, not rebuilt: its stored rows are the bundle's vectors.
    np.testing.assert_allclose(np.asarray(bundle.index.get_items([0, 41])), bundle.vectors[[0, 41]], atol=1e-6)


def test_refuses_a_bundle_built_for_another_template(bundle_copy):
    other = bundle_copy(template_version=TEMPLATE_VERSION + "-old")
    with pytest.raises(mf.BundleError, match="template version"):
        LoadedBundle.load(other, prefer_gpu=False)


def test_refuses_a_tampered_bundle(bundle_copy):
    tampered = bundle_copy(copy=(mf.ITEMS_FILE,))
    with (tampered / mf.ITEMS_FILE).open("a") as handle:
        handle.write('{"id": "extra", "title": "Extra (2000)"}\n')
    with pytest.raises(mf.BundleError, match="sha256"):
        LoadedBundle.load(tampered, prefer_gpu=False)


def test_refuses_items_that_disagree_with_the_manifest(bundle_copy):
    inconsistent = bundle_copy(item_count=41)
    with pytest.raises(mf.BundleError, match="42 items"):
        LoadedBundle.load(inconsistent, prefer_gpu=False)


def test_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    with pytest.raises(mf.BundleError, match="not a bundle"):
        LoadedBundle.load(tmp_path, prefer_gpu=False)
