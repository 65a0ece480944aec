from llmrec.template import ItemFields, RequestContext, UserText, describe_time, render_item, render_user

STAR_WARS = ItemFields("Star Wars (1977)", ("Action", "Sci-Fi"))
FARGO = ItemFields("Fargo (1996)", ("Crime", "Drama"))
TITANIC = ItemFields("Titanic (1997)", ("Drama", "Romance"))


def test_user_text_puts_context_first_and_most_recent_history_first():
    context = RequestContext(timestamp=0.0, device="mobile", query="space adventure")
    text = render_user(UserText([STAR_WARS, FARGO, TITANIC], context))
    assert text.startswith("looking for: space adventure. time: thursday night. device: mobile.")
    assert text.index("Titanic") < text.index("Fargo") < text.index("Star Wars")


def test_history_is_capped_to_the_most_recent_items():
    text = render_user(UserText([STAR_WARS, FARGO, TITANIC]), max_history_items=2)
    assert "Star Wars" not in text and "Titanic" in text and "Fargo" in text


def test_time_of_day_respects_utc_offset():
    noon_utc = 12 * 3600.0  # 1970-01-01 was a Thursday
    assert describe_time(noon_utc) == "thursday afternoon"
    assert describe_time(noon_utc, utc_offset_minutes=-13 * 60) == "wednesday night"


def test_item_text_has_every_field_and_long_fields_are_capped():
    item = ItemFields("A" * 500, ("Tools", "Saws"), "Acme", "sharp")
    text = render_item(item)
    assert "categories: Tools, Saws" in text and "brand: Acme" in text and text.endswith("sharp")
    assert len(text) < 400 and "…" in text


def test_empty_context_renders_only_history():
    assert render_user(UserText([FARGO])) == "recently: Fargo (1996) (Crime, Drama)"
