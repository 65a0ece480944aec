"""Explanations: which parts of the user text (history items, query terms) a recommended item is most like.

Attribution (cheap, and measured for faithfulness by clients/explain_eval.py):
- a history source is each distinct item of the window the model read (the most recent max_history_items);
  its vector is the item's catalogue vector (index row without the bias), or, for an item given as text,
  its text through the item tower;
- the query's vector is the query text through the item tower (the same space as the item vectors);
- similarity = cosine(recommended item's vector, source vector);
- weight = max(similarity, 0), normalized over the history sources and the query; the query's weight is then
  split among its terms (stop words dropped) in proportion to max(cosine(item, term vector), 0).
A recommended item most like one history item is explained by it: removing that item from the history
lowers the item's score more than removing another one, on most users (clients/explain_eval.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from llmrec.server.domain import Explanation, Reason

HISTORY = "history"
QUERY_TERM = "query_term"
MAX_HISTORY_REASONS = 3
MAX_TERM_REASONS = 3
MAX_TERMS = 8
_SUMMARY_QUERY_CHARS = 60
_WORD = re.compile(r"[\w][\w'-]*")
STOP_WORDS = frozenset("""
a about after all also an and any are as at be because been before being best but by can could do does
for from get give good has have i if in into is it its just like looking me more most my new no not of on
one or our out please show similar so some something that the their them then there these they this to
too up us very want was we what when which who will with would you your
""".split())


def query_terms(query: str) -> list[str]:
    """The distinct content words of a query, in order (at most MAX_TERMS); the whole query if it has none."""
    terms: list[str] = []
    for word in _WORD.findall(query.casefold()):
        word = word.strip("'-")
        if len(word) > 1 and word not in STOP_WORDS and word not in terms:
            terms.append(word)
    if not terms and query.strip():
        terms = [" ".join(query.split())[:_SUMMARY_QUERY_CHARS]]
    return terms[:MAX_TERMS]


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def explain(
    item_vectors: np.ndarray,
    history: Sequence[tuple[str, str]],
    history_vectors: np.ndarray,
    query: str = "",
    query_vector: np.ndarray | None = None,
    terms: Sequence[str] = (),
    term_vectors: np.ndarray | None = None,
) -> list[Explanation]:
    """One Explanation per recommended item.

    Args:
        item_vectors: (n, d) vectors of the recommended items (index rows without the bias).
        history: (item_id or "", title) of each distinct history source, most recent first.
        history_vectors: (len(history), d) their vectors.
        query: the query text ("" for none); used in the summary.
        query_vector: (d,) the query's vector, or None without a query.
        terms: the query's terms (query_terms(query)).
        term_vectors: (len(terms), d) their vectors.
    """
    if not len(item_vectors):
        return []
    items = _unit(item_vectors)
    sources = _unit(history_vectors) if len(history) else np.zeros((0, items.shape[1]), np.float32)
    has_query = query_vector is not None and bool(terms)
    if has_query:
        sources = np.vstack([sources, _unit(np.asarray(query_vector)[None, :])])
    similarity = items @ sources.T  # (n, sources)
    positive = np.maximum(similarity, 0.0)
    totals = positive.sum(axis=1, keepdims=True)
    weights = np.divide(positive, totals, out=np.zeros_like(positive), where=totals > 0)
    if has_query:
        term_similarity = items @ _unit(np.asarray(term_vectors)).T  # (n, terms)
        term_positive = np.maximum(term_similarity, 0.0)
        term_totals = term_positive.sum(axis=1, keepdims=True)
        term_share = np.divide(term_positive, term_totals, out=np.full_like(term_positive, 1.0 / len(terms)),
                               where=term_totals > 0)
    explanations = []
    for row in range(len(items)):
        history_reasons = [
            Reason(HISTORY, item_id, title, float(weights[row, n]), float(similarity[row, n]))
            for n, (item_id, title) in enumerate(history)
        ]
        history_reasons.sort(key=lambda r: r.weight, reverse=True)
        term_reasons: list[Reason] = []
        if has_query:
            query_weight = float(weights[row, len(history)])
            term_reasons = [
                Reason(QUERY_TERM, "", term, query_weight * float(term_share[row, n]), float(term_similarity[row, n]))
                for n, term in enumerate(terms)
            ]
            term_reasons.sort(key=lambda r: r.weight, reverse=True)
        shown = [r for r in history_reasons[:MAX_HISTORY_REASONS] + term_reasons[:MAX_TERM_REASONS] if r.weight > 0]
        shown.sort(key=lambda r: r.weight, reverse=True)
        query_weight = sum(r.weight for r in term_reasons)
        explanations.append(Explanation(tuple(shown), summary(history_reasons, query if has_query else "",
                                                              query_weight)))
    return explanations


def summary(history_reasons: Sequence[Reason], query: str, query_weight: float) -> str:
    """One sentence: the one or two history items it is most like, and the query when it counts at least half
    as much as the top history item, e.g. 'Because you liked Alien (1979) and asked for "space horror"'."""
    history_part = ""
    top = history_reasons[0].weight if history_reasons else 0.0
    if history_reasons and top > 0:
        titles = [history_reasons[0].text]
        if len(history_reasons) > 1 and history_reasons[1].weight >= 0.9 * top:
            titles.append(history_reasons[1].text)
        history_part = "liked " + " and ".join(titles)
    query_part = ""
    if query and (query_weight >= 0.5 * top or not history_part):
        text = " ".join(query.split())
        if len(text) > _SUMMARY_QUERY_CHARS:
            text = text[: _SUMMARY_QUERY_CHARS - 1].rstrip() + "…"
        query_part = f'asked for "{text}"'
    parts = [p for p in (history_part, query_part) if p]
    if query_part and history_part and query_weight > top:
        parts.reverse()
    if not parts:
        return "Recommended for your current context"
    return "Because you " + " and ".join(parts)
