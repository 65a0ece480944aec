"""server.errors' rich statuses (the one table, bounded contents) and the client's reading of them."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import grpc
import pytest

from llmrec.clients.client import RETRYABLE_CODES, RecommenderError
from llmrec.clients.status_details import FieldViolation, StatusDetails, parse_status_details
from llmrec.server import errors, validation
from llmrec.server.errors import (
    ERROR_MESSAGE_BYTES, ERROR_METADATA_BYTES, ERROR_TABLE, Aborted, DeadlineExceeded, FailedPrecondition,
    InvalidArgument, NotFound, ResourceExhausted, ThrottledWarning, Unavailable, rich_status,
    unknown_items,
)
from llmrec.server.session import _quiet
from tests.google_rpc_details import unpacked


def test_every_domain_error_maps_through_the_one_table():
    for cls in (InvalidArgument, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted, FailedPrecondition,
                Aborted):
        status = rich_status(cls("why"))
        assert status.code == ERROR_TABLE[cls].code.value[0] and status.message == "why"
        info = unpacked(status)["info"]
        assert info.reason == ERROR_TABLE[cls].reason and info.domain == "llmrec.v1"
        assert info.reason == info.reason.upper() and " " not in info.reason

    class Narrower(NotFound):
        pass

    assert rich_status(Narrower("x")).code == grpc.StatusCode.NOT_FOUND.value[0]  # the nearest listed base


def test_retry_info_on_resource_exhausted_and_where_an_unavailable_says_so():
    assert unpacked(rich_status(ResourceExhausted("full")))["retry"].retry_delay.seconds == 1
    assert "retry" not in unpacked(rich_status(Unavailable("storage broken")))  # retrying would not help
    delay = unpacked(rich_status(Unavailable("loading", retry_after_s=0.25)))["retry"].retry_delay
    assert (delay.seconds, delay.nanos) == (0, 250_000_000)
    assert "retry" not in unpacked(rich_status(InvalidArgument("bad")))


def test_validation_errors_name_their_field_path():
    limits = validation.Limits()
    with pytest.raises(InvalidArgument) as caught:
        validation.check_history(
            (validation.HistoryRef(item_id="a"),) * 3 + (validation.HistoryRef(item_id=""),), limits)
    assert caught.value.field == "history[3].item_id"
    found = unpacked(rich_status(caught.value))
    assert [v.field for v in found["bad_request"].field_violations] == ["history[3].item_id"]
    assert found["info"].reason == "INVALID_FIELD" and found["info"].metadata["field"] == "history[3].item_id"
    with pytest.raises(InvalidArgument) as k_error:
        validation.check_k(0, limits)
    assert k_error.value.field == "k"


def test_unexpected_errors_are_internal_with_error_info_and_a_logged_traceback(caplog):
    status = rich_status(KeyError("secret internals"), "Recommend")
    assert status.code == grpc.StatusCode.INTERNAL.value[0] and "secret" not in status.message
    assert unpacked(status)["info"].reason == "INTERNAL"
    assert "secret internals" in caplog.text


def test_what_a_status_carries_is_bounded():
    huge = InvalidArgument("é" * 10_000, field="f" * 5_000, metadata={"k": "v" * 10_000, "other": "w" * 10_000})
    found = errors.describe(huge)
    assert len(found.message.encode()) <= ERROR_MESSAGE_BYTES and found.message.endswith("…")
    assert sum(len(k.encode()) + len(v.encode()) for k, v in found.metadata.items()) <= ERROR_METADATA_BYTES
    assert len(rich_status(InvalidArgument("é" * 10_000, field="x" * 5_000)).SerializeToString()) < 3000


def test_unknown_ids_are_cut_in_the_message_and_kept_whole_in_metadata_when_they_fit():
    error = unknown_items(["x" * 3000, "short", "\U0001F600" * 100, *(f"id{i}" for i in range(5))], "gone")
    assert error.message.startswith("unknown item ids '" + "x" * 64 + "'…, 'short', ")
    assert "and 3 more" in error.message
    assert error.metadata["unknown_count"] == "8" and error.reason == "ITEM_NOT_FOUND"
    assert json.loads(error.metadata["item_ids"]) == ["short", "\U0001F600" * 100, "id0", "id1", "id2", "id3", "id4"]
    assert len(unknown_items(["a"], "x").message) < 40 and "'a'" in unknown_items(["a"], "x").message


def test_the_client_reads_the_details():
    status = rich_status(InvalidArgument("k must be between 1 and 100, got 0", field="k"))
    assert parse_status_details(status.SerializeToString()) == StatusDetails(
        reason="INVALID_FIELD", domain="llmrec.v1", metadata={"field": "k"},
        field_violations=(FieldViolation("k", "k must be between 1 and 100, got 0"),), retry_after_s=None)
    busy = parse_status_details(rich_status(ResourceExhausted("busy", retry_after_s=0.5)).SerializeToString())
    assert busy.retry_after_s == 0.5 and busy.reason == "RESOURCE_EXHAUSTED"


def test_retryable_codes():
    assert RecommenderError(grpc.StatusCode.UNAVAILABLE, "x").retryable
    assert not RecommenderError(grpc.StatusCode.INVALID_ARGUMENT, "x").retryable
    assert not RecommenderError(grpc.StatusCode.INTERNAL, "x").retryable
    assert RETRYABLE_CODES == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


def test_throttled_warnings_log_one_line_per_window_and_count_the_rest(caplog):
    throttled = ThrottledWarning(logging.getLogger("test.throttled"), every_s=60)
    for _ in range(5):
        throttled.warning("bad bytes from %s", "someone")
    assert [r.getMessage() for r in caplog.records] == ["bad bytes from someone"]
    throttled._next = 0  # the window has passed
    throttled.warning("bad bytes from %s", "someone")
    assert caplog.records[-1].getMessage() == "bad bytes from someone (4 more like it in the last 60 s not logged)"


def test_a_quiet_task_never_reports_an_unretrieved_exception(caplog):
    async def fails():
        raise StopAsyncIteration

    async def main():
        task = _quiet(asyncio.ensure_future(fails()))
        await asyncio.sleep(0.01)
        assert task.done()

    asyncio.run(main())
    gc.collect()
    assert "never retrieved" not in caplog.text
