"""The recommender core: resolve a history, render it with the shared template, encode it, search the index.

No gRPC here: inputs and outputs are server.domain types, failures are server.errors exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from llmrec.template import ItemFields, UserText, render_item, render_user

from server import validation
from server.bundle import LoadedBundle
from server.domain import HistoryRef, RecommendQuery, ScoredItem, UserInput
from server.encoding import AsyncEncoder
from server.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

_MAX_IDS_IN_MESSAGE = 5


class Recommender:
    """Ranks catalogue items for a user with one bundle's encoder and index.

    Args:
        bundle: the loaded bundle.
        encoder: the async encoder running the bundle's model.
        limits: request limits to enforce.
    """

    def __init__(self, bundle: LoadedBundle, encoder: AsyncEncoder, limits: validation.Limits) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.limits = limits
        self._max_history_items = bundle.manifest.max_history_items

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def index_version(self) -> str:
        return self.bundle.index_version

    # --- users -------------------------------------------------------------------------------------------

    def resolve_history(self, history: Iterable[HistoryRef]) -> list[ItemFields]:
        """Catalogue ids and raw texts -> ItemFields, in order.

        Raises:
            NotFound: some ids are not in the catalogue (the message names them).
        """
        resolved: list[ItemFields] = []
        unknown: list[str] = []
        for ref in history:
            if ref.text is not None:
                resolved.append(ref.text)
                continue
            row = self.bundle.row_of.get(ref.item_id or "")
            if row is None:
                unknown.append(ref.item_id or "")
            else:
                resolved.append(self.bundle.items[row])
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:_MAX_IDS_IN_MESSAGE])
            more = f" and {len(unknown) - _MAX_IDS_IN_MESSAGE} more" if len(unknown) > _MAX_IDS_IN_MESSAGE else ""
            noun = "item id" if len(unknown) == 1 else "item ids"
            raise NotFound(f"unknown {noun} {shown}{more}: not in the catalogue of model {self.model_version}")
        return resolved

    def check_user(self, user: UserInput, field_prefix: str = "") -> None:
        """Everything that can be wrong with a user input, without encoding it (validation and unknown ids)."""
        validation.check_user(user, self.limits, field_prefix)
        self.resolve_history(user.history)

    def render(self, user: UserInput) -> str:
        """The model input text for a user, by the shared template (llmrec.template)."""
        history = self.resolve_history(user.history)
        return render_user(UserText(history=history, context=user.context), self._max_history_items)

    # --- ranking -----------------------------------------------------------------------------------------

    async def recommend(self, query: RecommendQuery) -> list[ScoredItem]:
        """The top query.k items for a user, exclusions applied inside the search.

        Raises:
            InvalidArgument: the query breaks a limit or has neither history nor query text.
            NotFound: the history names an unknown item id.
        """
        validation.check_query(query, self.limits)
        text = self.render(query.user)
        user_vector = (await self.encoder.encode_users([text]))[0]
        return self.search(user_vector, query.k, self.excluded_rows(query))

    def excluded_rows(self, query: RecommendQuery) -> set[int]:
        """Index labels that must not come back: explicit exclusions, and catalogued history if asked."""
        ids = set(query.exclude_item_ids)
        if query.exclude_history:
            ids.update(ref.item_id for ref in query.user.history if ref.item_id is not None)
        row_of = self.bundle.row_of
        return {row_of[i] for i in ids if i in row_of}

    def search(self, user_vector: np.ndarray, k: int, excluded_rows: set[int]) -> list[ScoredItem]:
        """Top-k items by inner product of [user_vector, 1.0] with the rows [item_vector, item_bias].

        Fewer than k come back only when exclusions leave fewer than k items in the catalogue.
        """
        k = min(k, len(self.bundle.item_ids) - len(excluded_rows))
        if k <= 0:
            return []
        query = np.append(np.asarray(user_vector, dtype=np.float32), np.float32(1.0))[None, :]
        # The filter runs inside the HNSW walk, so excluded items never take result slots and k still come back.
        allowed = (lambda label: label not in excluded_rows) if excluded_rows else None
        try:
            labels, distances = self.bundle.index.knn_query(query, k=k, num_threads=1, filter=allowed)
            rows = labels[0].tolist()
            scores = (1.0 - distances[0]).tolist()  # hnswlib "ip" distance is 1 - inner product
        except RuntimeError:
            # hnswlib raises when the graph walk finds fewer than k allowed items (possible under heavy
            # filtering); an exact scan over the index rows is slower but always complete.
            logger.warning("HNSW search returned fewer than %d items; falling back to exact search", k)
            rows, scores = self._exact_search(query[0], k, excluded_rows)
        return [
            ScoredItem(item_id=self.bundle.item_ids[row], score=float(score),
                       title=self.bundle.items[row].title, rank=rank)
            for rank, (row, score) in enumerate(zip(rows, scores), 1)
        ]

    def _exact_search(self, query: np.ndarray, k: int, excluded_rows: set[int]) -> tuple[list[int], list[float]]:
        scores = np.asarray(self.bundle.vectors, dtype=np.float32) @ query
        if excluded_rows:
            scores[list(excluded_rows)] = -np.inf
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top.tolist(), scores[top].tolist()

    # --- embeddings --------------------------------------------------------------------------------------

    async def embed(
        self, items: Sequence[ItemFields], users: Sequence[UserInput], max_inputs: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors for item texts (item window) and users (user window), in request order.

        Raises:
            InvalidArgument: too many inputs, or one breaks a limit.
            NotFound: a user history names an unknown item id.
        """
        if len(items) + len(users) > max_inputs:
            raise InvalidArgument(f"embed takes at most {max_inputs} items and users together, "
                                  f"got {len(items) + len(users)}")
        for position, item in enumerate(items):
            validation.check_item_text(item, f"items[{position}]", self.limits)
        user_texts = []
        for position, user in enumerate(users):
            validation.check_user(user, self.limits, f"users[{position}].")
            user_texts.append(self.render(user))
        item_vectors = await self.encoder.encode_items([render_item(item) for item in items])
        user_vectors = await self.encoder.encode_users(user_texts)
        return item_vectors, user_vectors
