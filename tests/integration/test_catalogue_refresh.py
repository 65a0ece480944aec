"""The training loop's catalogue refresh: keeping the frozen layers' output must not change the item vectors."""

from pathlib import Path

import pytest
import torch

from llmrec.template import render_item
from llmrec.training.data import load_interactions
from llmrec.training.model import CatalogueEncoder, TextRecommender, pretrained_encoder_path

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


@pytest.fixture(scope="module")
def item_texts():
    return [render_item(item) for item in load_interactions(TINY).items]


def perturb_trained_layers(model: TextRecommender) -> None:
    """Stand-in for optimizer steps: move every layer above the frozen ones."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.encoder.encoder.layer[model.frozen_layers :]:
            weight = layer.output.dense.weight
            weight.add_(0.02 * torch.randn(weight.shape, generator=generator))


@pytest.mark.parametrize("frozen_layers", [0, 2, 5])
def test_refresh_matches_the_whole_encoder_after_the_trained_layers_move(item_texts, frozen_layers):
    model = TextRecommender(pretrained_encoder_path(), len(item_texts))
    model.freeze_bottom(frozen_layers)
    model.train()
    catalogue = CatalogueEncoder(model, item_texts, max_tokens=64, batch_size=16)  # several padded batches
    assert catalogue.caches_frozen_layers == (frozen_layers > 0)
    before = catalogue.encode()
    perturb_trained_layers(model)
    after = catalogue.encode()
    expected = model.encode_all(item_texts, 64)
    assert model.training  # refreshing mid-training leaves the model in training mode
    assert (after - before).abs().max() > 1e-3  # the refresh sees the new weights
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(len(item_texts)))


def test_a_catalogue_too_large_to_keep_runs_the_whole_encoder(item_texts):
    model = TextRecommender(pretrained_encoder_path(), len(item_texts))
    model.freeze_bottom(2)
    catalogue = CatalogueEncoder(model, item_texts, max_tokens=64, max_cached_bytes=1024)
    assert not catalogue.caches_frozen_layers
    perturb_trained_layers(model)
    torch.testing.assert_close(catalogue.encode(), model.encode_all(item_texts, 64), atol=1e-6, rtol=0)
