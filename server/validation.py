"""Request checks. Each failure raises InvalidArgument with a message that names the field and the limit, and
with `field` set to that field's path (history[3].item_id, k), which the status carries as a BadRequest violation."""

from __future__ import annotations

import dataclasses
import math

from llmrec.template import ItemFields, RequestContext, describe_time

from llmrec.server.domain import AttributeFilter, CatalogueItem, HistoryRef, RecommendQuery, UserInput
from llmrec.server.errors import InvalidArgument, shown_id

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
    max_exclude_ids: int = 10_000  # exclude_item_ids of one request or session
    max_rejected_items: int = 1000  # rejected_item_ids of one request, or the rejections a session holds
    max_filters: int = 16          # filters of one request, each with at most max_filter_values values
    max_filter_values: int = 100
    max_catalogue_batch: int = 1000  # items of one UpsertItems or ids of one DeleteItems
    max_attributes: int = 64         # attributes of one catalogue item
    max_page_size: int = 1000        # ListItems

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits a server's settings (server.settings.ServerSettings) set; the rest keep their defaults."""
        return cls(settings.max_k, settings.max_request_history, settings.max_text_chars)


def check_k(k: int, limits: Limits, field: str = "k") -> None:
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"{field} must be between 1 and {limits.max_k}, got {k}", field=field)


def check_page_size(page_size: int) -> None:
    if page_size < 0:
        raise InvalidArgument(f"page_size must be >= 0 (0 means the default), got {page_size}", field="page_size")


def check_list_page_size(page_size: int, limits: Limits, default: int = 100) -> int:
    """ListItems page_size: 0 means `default`; returns the size to use."""
    if not 0 <= page_size <= limits.max_page_size:
        raise InvalidArgument(f"page_size must be between 0 (the default, {default}) and {limits.max_page_size}, "
                              f"got {page_size}", field="page_size")
    return page_size or default


def check_text(value: str, field: str, limits: Limits, path: str | None = None) -> None:
    """`field` names the text in the message; `path` (default: field) is its path for the field violation."""
    if len(value) > limits.max_text_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters long; the limit is {limits.max_text_chars}",
                              field=path or field)


def check_item_text(item: ItemFields, field: str, limits: Limits) -> None:
    """An item given as text: a non-blank title and every field within max_text_chars."""
    if not item.title.strip():
        raise InvalidArgument(f"{field}.title is empty: an item given as text needs a title", field=f"{field}.title")
    check_text(item.title, f"{field}.title", limits)
    for position, category in enumerate(item.categories):
        check_text(category, f"{field}.categories[{position}]", limits)
    check_text(item.brand, f"{field}.brand", limits)
    check_text(item.description, f"{field}.description", limits)


def check_history_ref(ref: HistoryRef, field: str, limits: Limits) -> None:
    if (ref.item_id is None) == (ref.text is None):
        raise InvalidArgument(f"{field} must set exactly one of item_id and text", field=field)
    if ref.item_id is not None:
        if not ref.item_id:
            raise InvalidArgument(f"{field}.item_id is empty", field=f"{field}.item_id")
        check_text(ref.item_id, f"{field}.item_id", limits)
    else:
        assert ref.text is not None
        check_item_text(ref.text, f"{field}.text", limits)


def check_history(history: tuple[HistoryRef, ...] | list[HistoryRef], limits: Limits, field: str = "history") -> None:
    if len(history) > limits.max_request_history:
        raise InvalidArgument(
            f"{field} has {len(history)} items; the limit is {limits.max_request_history} (send the most recent)",
            field=field,
        )
    for position, ref in enumerate(history):
        check_history_ref(ref, f"{field}[{position}]", limits)


def check_context(context: RequestContext, limits: Limits, field: str = "context") -> None:
    check_text(context.query, f"{field}.query", limits)
    check_text(context.device, f"{field}.device", limits)
    check_text(context.locale, f"{field}.locale", limits)
    if abs(context.utc_offset_minutes) > MAX_UTC_OFFSET_MINUTES:
        raise InvalidArgument(
            f"{field}.utc_offset_minutes must be within ±{MAX_UTC_OFFSET_MINUTES}, got {context.utc_offset_minutes}",
            field=f"{field}.utc_offset_minutes",
        )
    if context.timestamp is not None:
        try:  # the template derives day and time from it; refuse what it cannot render
            describe_time(context.timestamp, context.utc_offset_minutes)
        except (OverflowError, OSError, ValueError) as error:
            raise InvalidArgument(f"{field}.timestamp is out of range ({error})", field=f"{field}.timestamp") from error


def check_user(user: UserInput, limits: Limits, field_prefix: str = "", require_content: bool = True) -> None:
    """History and context checks; with require_content, also refuse a user with no history and no query."""
    check_history(user.history, limits, f"{field_prefix}history")
    check_context(user.context, limits, f"{field_prefix}context")
    if require_content and not user.history and not user.context.query.strip():
        where = field_prefix.rstrip(".")
        raise InvalidArgument(f"{where}: {EMPTY_USER_MESSAGE}" if where else EMPTY_USER_MESSAGE,
                              field=f"{field_prefix}history")


def check_exclusions(item_ids, limits: Limits, field: str = "exclude_item_ids") -> None:
    if len(item_ids) > limits.max_exclude_ids:
        raise InvalidArgument(f"{field} has {len(item_ids)} ids; the limit is {limits.max_exclude_ids}", field=field)
    for item_id in item_ids:
        check_text(item_id, f"{field}[]", limits, path=field)  # a set: no position to name


def check_filters(filters: tuple[AttributeFilter, ...], limits: Limits, field: str = "filters") -> None:
    if len(filters) > limits.max_filters:
        raise InvalidArgument(f"{field} has {len(filters)} filters; the limit is {limits.max_filters}", field=field)
    for position, attribute_filter in enumerate(filters):
        where = f"{field}[{position}]"
        if not attribute_filter.key.strip():
            raise InvalidArgument(f"{where}.key is empty: name an attribute, e.g. \"category\"", field=f"{where}.key")
        check_text(attribute_filter.key, f"{where}.key", limits)
        if not attribute_filter.values:
            raise InvalidArgument(f"{where}.values is empty: give at least one value to keep", field=f"{where}.values")
        if len(attribute_filter.values) > limits.max_filter_values:
            raise InvalidArgument(f"{where}.values has {len(attribute_filter.values)} values; the limit is "
                                  f"{limits.max_filter_values}", field=f"{where}.values")
        for number, value in enumerate(attribute_filter.values):
            check_text(value, f"{where}.values[{number}]", limits)


def check_rejected(item_ids, limits: Limits, field: str = "rejected_item_ids") -> None:
    """Rejected item ids: at most max_rejected_items, each a non-empty id (unknown ones are allowed: ignored)."""
    if len(item_ids) > limits.max_rejected_items:
        raise InvalidArgument(f"{field} has {len(item_ids)} ids; the limit is {limits.max_rejected_items}",
                              field=field)
    for position, item_id in enumerate(item_ids):
        check_item_id(item_id, f"{field}[{position}]", limits)


def check_min_score(min_score: float | None, field: str = "min_score") -> None:
    if min_score is not None and not math.isfinite(min_score):
        raise InvalidArgument(f"{field} must be a finite number (or unset for no threshold), got {min_score}",
                              field=field)


def check_new_item_share(share: float | None, field: str = "new_item_share") -> None:
    if share is not None and not 0.0 <= share <= 1.0:  # also refuses NaN
        raise InvalidArgument(f"{field} must be between 0 and 1 (a share of k), got {share}", field=field)


def check_query(query: RecommendQuery, limits: Limits) -> None:
    check_k(query.k, limits)
    check_new_item_share(query.new_item_share)
    check_exclusions(query.exclude_item_ids, limits)
    check_rejected(query.rejected_item_ids, limits)
    check_min_score(query.min_score)
    check_filters(query.filters, limits)
    check_user(query.user, limits)


def check_batch_size(count: int, max_requests: int, field: str = "requests") -> None:
    """RecommendBatch: 1..max_requests requests."""
    if not 1 <= count <= max_requests:
        got = "none" if not count else str(count)
        raise InvalidArgument(f"{field} must hold 1 to {max_requests} requests (max_recommend_batch), got {got}",
                              field=field)


def check_item_id(item_id: str, field: str, limits: Limits) -> None:
    if not item_id.strip():
        raise InvalidArgument(f"{field} is empty", field=field)
    check_text(item_id, field, limits)


def check_item_ids(item_ids, limits: Limits, field: str = "item_ids") -> None:
    if not item_ids:
        raise InvalidArgument(f"{field} is empty: give at least one id", field=field)
    if len(item_ids) > limits.max_catalogue_batch:
        raise InvalidArgument(f"{field} has {len(item_ids)} ids; the limit is {limits.max_catalogue_batch}",
                              field=field)
    for position, item_id in enumerate(item_ids):
        check_item_id(item_id, f"{field}[{position}]", limits)


def check_catalogue_items(items: tuple[CatalogueItem, ...] | list[CatalogueItem], limits: Limits) -> None:
    """An UpsertItems batch: 1..max_catalogue_batch items, distinct non-empty ids, titled text, bounded attributes."""
    if not items:
        raise InvalidArgument("items is empty: give at least one item", field="items")
    if len(items) > limits.max_catalogue_batch:
        raise InvalidArgument(f"items has {len(items)} items; the limit is {limits.max_catalogue_batch} per call",
                              field="items")
    seen: set[str] = set()
    for position, item in enumerate(items):
        where = f"items[{position}]"
        check_item_id(item.item_id, f"{where}.item_id", limits)
        if item.item_id in seen:
            raise InvalidArgument(f"{where}.item_id {shown_id(item.item_id)} appears twice in one call",
                                  field=f"{where}.item_id")
        seen.add(item.item_id)
        check_item_text(item.fields, f"{where}.text", limits)
        if len(item.attributes) > limits.max_attributes:
            raise InvalidArgument(f"{where}.attributes has {len(item.attributes)} entries; the limit is "
                                  f"{limits.max_attributes}", field=f"{where}.attributes")
        for key, value in item.attributes:
            if not key.strip():
                raise InvalidArgument(f"{where}.attributes has an empty key", field=f"{where}.attributes")
            check_text(key, f"{where}.attributes key", limits, path=f"{where}.attributes")
            check_text(value, f"{where}.attributes[{shown_id(key)}]", limits, path=f"{where}.attributes")


def check_bundle_path(path: str, limits: Limits) -> None:
    """LoadModel.bundle_path: "" (the newest bundle under bundle_root) or a directory name the OS can take."""
    check_text(path, "bundle_path", limits)
    if "\0" in path:
        raise InvalidArgument("bundle_path contains a NUL character", field="bundle_path")
