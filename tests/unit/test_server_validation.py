"""Request validation and the error table, without a model."""

from __future__ import annotations

import grpc
import pytest

from llmrec.template import ItemFields, RequestContext
from llmrec.server import validation
from llmrec.server.domain import HistoryRef, RecommendQuery, UserInput
from llmrec.server.errors import INTERNAL_MESSAGE, InvalidArgument, NotFound, Unavailable, code_number, status_for

LIMITS = validation.Limits(max_k=10, max_request_history=3, max_text_chars=20)


def query(history=(HistoryRef(item_id="a"),), k=5, **context) -> RecommendQuery:
    return RecommendQuery(user=UserInput(tuple(history), RequestContext(**context)), k=k)


def refused(function, *args) -> str:
    with pytest.raises(InvalidArgument) as caught:
        function(*args)
    return str(caught.value)


def test_a_good_query_passes():
    validation.check_query(query(k=10, query="x" * 20, device="tv"), LIMITS)
    validation.check_query(query(history=(), query="space"), LIMITS)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_k_outside_one_to_max_k(k):
    assert refused(validation.check_query, query(k=k), LIMITS) == f"k must be between 1 and 10, got {k}"


def test_empty_history_without_query_has_the_documented_message():
    assert refused(validation.check_query, query(history=()), LIMITS) == validation.EMPTY_USER_MESSAGE
    assert refused(validation.check_query, query(history=(), query="  "), LIMITS) == validation.EMPTY_USER_MESSAGE
    embed_message = refused(validation.check_user, UserInput(), LIMITS, "users[2].")
    assert embed_message == "users[2]: " + validation.EMPTY_USER_MESSAGE


@pytest.mark.parametrize("history, words", [
    ((HistoryRef(),), "history[0] must set exactly one of item_id and text"),
    ((HistoryRef(item_id="a", text=ItemFields("t")),), "exactly one"),
    ((HistoryRef(item_id=""),), "history[0].item_id is empty"),
    ((HistoryRef(text=ItemFields(" ")),), "history[0].text.title is empty"),
    ((HistoryRef(text=ItemFields("t", brand="b" * 21)),), "history[0].text.brand is 21 characters long"),
    ((HistoryRef(text=ItemFields("t", categories=("ok", "c" * 21))),), "history[0].text.categories[1]"),
    ((HistoryRef(item_id="a"),) * 4, "history has 4 items; the limit is 3"),
])
def test_bad_history(history, words):
    assert words in refused(validation.check_query, query(history=history), LIMITS)


@pytest.mark.parametrize("context, words", [
    ({"query": "q" * 21}, "context.query is 21 characters long; the limit is 20"),
    ({"locale": "l" * 21}, "context.locale"),
    ({"utc_offset_minutes": 15 * 60}, "utc_offset_minutes"),
    ({"timestamp": 1e20}, "context.timestamp is out of range"),
])
def test_bad_context(context, words):
    assert words in refused(validation.check_query, query(**context), LIMITS)


def test_page_size():
    validation.check_page_size(0)
    assert "page_size" in refused(validation.check_page_size, -1)


def test_status_table():
    assert status_for(InvalidArgument("bad k")) == (grpc.StatusCode.INVALID_ARGUMENT, "bad k")
    assert status_for(NotFound("no such id")) == (grpc.StatusCode.NOT_FOUND, "no such id")
    assert status_for(Unavailable("loading"))[0] == grpc.StatusCode.UNAVAILABLE
    assert code_number(grpc.StatusCode.NOT_FOUND) == 5 and code_number(grpc.StatusCode.OK) == 0


def test_unexpected_errors_become_a_generic_internal_status(caplog):
    code, message = status_for(KeyError("secret internals"), "Recommend")
    assert code == grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE
    assert "secret internals" not in message
    assert "unexpected error in Recommend" in caplog.text
