"""The text template: how items, histories and context become model input, for training and serving alike.

This module is the single source of truth for model input text. It is torch-free so that the server can
import it; the bundle manifest records TEMPLATE_VERSION and the server refuses a bundle built with another.
Change anything that alters rendered text => bump TEMPLATE_VERSION.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

TEMPLATE_VERSION = "1"

# Per-field caps in characters: they keep one item from eating the token window.
_ITEM_CAPS = {"title": 200, "categories": 120, "brand": 40, "description": 300}
# A history entry is rendered shorter than a standalone item so that ~10 items fit in the user window.
_HISTORY_TITLE_CAP = 100
_HISTORY_CATEGORIES_CAP = 48
_QUERY_CAP = 200
_TIME_OF_DAY = ((5, "night"), (12, "morning"), (17, "afternoon"), (22, "evening"), (24, "night"))


@dataclass(frozen=True)
class ItemFields:
    """Text of one item. A release year belongs in the title, e.g. "Toy Story (1995)"."""

    title: str
    categories: tuple[str, ...] = ()
    brand: str = ""
    description: str = ""


@dataclass(frozen=True)
class RequestContext:
    """Where and when a recommendation is asked for. Every field is optional."""

    timestamp: float | None = None  # Unix seconds
    utc_offset_minutes: int = 0
    device: str = ""
    locale: str = ""
    query: str = ""


@dataclass(frozen=True)
class UserText:
    """What a user's representation is computed from: history (oldest first) and current context."""

    history: Sequence[ItemFields]
    context: RequestContext = field(default_factory=RequestContext)


def _cap(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def render_item(item: ItemFields) -> str:
    """Standalone item text, as the item tower reads it."""
    parts = [_cap(item.title, _ITEM_CAPS["title"])]
    if item.categories:
        parts.append("categories: " + _cap(", ".join(item.categories), _ITEM_CAPS["categories"]))
    if item.brand:
        parts.append("brand: " + _cap(item.brand, _ITEM_CAPS["brand"]))
    if item.description:
        parts.append(_cap(item.description, _ITEM_CAPS["description"]))
    return ". ".join(p for p in parts if p)


def render_history_item(item: ItemFields) -> str:
    """Compact item text used inside a user's history."""
    text = _cap(item.title, _HISTORY_TITLE_CAP)
    if item.categories:
        text += " (" + _cap(", ".join(item.categories), _HISTORY_CATEGORIES_CAP) + ")"
    return text


def describe_time(timestamp: float, utc_offset_minutes: int = 0) -> str:
    """'tuesday evening' style: what the model can learn habits from, unlike a raw timestamp."""
    local = dt.datetime.fromtimestamp(timestamp, tz=dt.timezone(dt.timedelta(minutes=utc_offset_minutes)))
    part = next(name for end, name in _TIME_OF_DAY if local.hour < end)
    return f"{local.strftime('%A').lower()} {part}"


def render_context(context: RequestContext) -> str:
    parts = []
    if context.query:
        parts.append("looking for: " + _cap(context.query, _QUERY_CAP))
    if context.timestamp is not None:
        parts.append("time: " + describe_time(context.timestamp, context.utc_offset_minutes))
    if context.device:
        parts.append("device: " + _cap(context.device, 20))
    if context.locale:
        parts.append("locale: " + _cap(context.locale, 20))
    return ". ".join(parts)


def render_user(user: UserText, max_history_items: int = 20) -> str:
    """User text: context first, then history most recent first, so token truncation drops the oldest."""
    recent = list(user.history)[-max_history_items:][::-1] if max_history_items > 0 else []
    return join_user_text(render_context(user.context), [render_history_item(item) for item in recent])


def join_user_text(context_text: str, recent_history_texts: Sequence[str]) -> str:
    """User text from a rendered context and rendered history items (render_history_item), most recent first.

    render_user is this applied to freshly rendered parts; live sessions keep the parts and call it directly,
    so one new event costs one rendered item, not a re-render of the whole history.
    """
    parts = []
    if context_text:
        parts.append(context_text)
    if recent_history_texts:
        parts.append("recently: " + "; ".join(recent_history_texts))
    return ". ".join(parts)
