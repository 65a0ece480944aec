"""Request checks. Each failure raises InvalidArgument with a message that names the field and the limit."""

from __future__ import annotations

import dataclasses

from llmrec.template import ItemFields, RequestContext, describe_time

from server.domain import HistoryRef, RecommendQuery, UserInput
from server.errors import InvalidArgument

EMPTY_USER_MESSAGE = (
    "history is empty and no query was given: send at least one history item or a context.query"
)
# Real offsets span UTC-12:00..UTC+14:00; beyond a day datetime.timezone itself refuses them.
MAX_UTC_OFFSET_MINUTES = 14 * 60


@dataclasses.dataclass(frozen=True)
class Limits:
    """The documented request limits (GetModelInfo reports them)."""

    max_k: int = 100
    max_request_history: int = 500
    max_text_chars: int = 2000


def check_k(k: int, limits: Limits, field: str = "k") -> None:
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"{field} must be between 1 and {limits.max_k}, got {k}")


def check_page_size(page_size: int) -> None:
    if page_size < 0:
        raise InvalidArgument(f"page_size must be >= 0 (0 means the default), got {page_size}")


def check_text(value: str, field: str, limits: Limits) -> None:
    if len(value) > limits.max_text_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters long; the limit is {limits.max_text_chars}")


def check_item_text(item: ItemFields, field: str, limits: Limits) -> None:
    """An item given as text: a non-blank title and every field within max_text_chars."""
    if not item.title.strip():
        raise InvalidArgument(f"{field}.title is empty: an item given as text needs a title")
    check_text(item.title, f"{field}.title", limits)
    for position, category in enumerate(item.categories):
        check_text(category, f"{field}.categories[{position}]", limits)
    check_text(item.brand, f"{field}.brand", limits)
    check_text(item.description, f"{field}.description", limits)


def check_history_ref(ref: HistoryRef, field: str, limits: Limits) -> None:
    if (ref.item_id is None) == (ref.text is None):
        raise InvalidArgument(f"{field} must set exactly one of item_id and text")
    if ref.item_id is not None:
        if not ref.item_id:
            raise InvalidArgument(f"{field}.item_id is empty")
        check_text(ref.item_id, f"{field}.item_id", limits)
    else:
        assert ref.text is not None
        check_item_text(ref.text, f"{field}.text", limits)


def check_history(history: tuple[HistoryRef, ...] | list[HistoryRef], limits: Limits, field: str = "history") -> None:
    if len(history) > limits.max_request_history:
        raise InvalidArgument(
            f"{field} has {len(history)} items; the limit is {limits.max_request_history} (send the most recent)"
        )
    for position, ref in enumerate(history):
        check_history_ref(ref, f"{field}[{position}]", limits)


def check_context(context: RequestContext, limits: Limits, field: str = "context") -> None:
    check_text(context.query, f"{field}.query", limits)
    check_text(context.device, f"{field}.device", limits)
    check_text(context.locale, f"{field}.locale", limits)
    if abs(context.utc_offset_minutes) > MAX_UTC_OFFSET_MINUTES:
        raise InvalidArgument(
            f"{field}.utc_offset_minutes must be within ±{MAX_UTC_OFFSET_MINUTES}, got {context.utc_offset_minutes}"
        )
    if context.timestamp is not None:
        try:  # the template derives day and time from it; refuse what it cannot render
            describe_time(context.timestamp, context.utc_offset_minutes)
        except (OverflowError, OSError, ValueError) as error:
            raise InvalidArgument(f"{field}.timestamp is out of range ({error})") from error


def check_user(user: UserInput, limits: Limits, field_prefix: str = "", require_content: bool = True) -> None:
    """History and context checks; with require_content, also refuse a user with no history and no query."""
    check_history(user.history, limits, f"{field_prefix}history")
    check_context(user.context, limits, f"{field_prefix}context")
    if require_content and not user.history and not user.context.query.strip():
        where = field_prefix.rstrip(".")
        raise InvalidArgument(f"{where}: {EMPTY_USER_MESSAGE}" if where else EMPTY_USER_MESSAGE)


def check_query(query: RecommendQuery, limits: Limits) -> None:
    check_k(query.k, limits)
    for item_id in query.exclude_item_ids:
        check_text(item_id, "exclude_item_ids[]", limits)
    check_user(query.user, limits)
