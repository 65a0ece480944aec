"""Real semantics end to end: the pretrained encoder, served, ranks by meaning."""

from __future__ import annotations

from llmrec.v1 import recommender_pb2 as pb


def ranking(stub, request: pb.RecommendRequest) -> list[str]:
    return [i.item_id for i in stub.Recommend(request, timeout=10).items]


def test_star_wars_fans_get_space_films_before_romantic_comedies(stub, tiny_catalogue):
    fields = dict(tiny_catalogue)
    space = {i for i, f in fields.items() if "Space" in f.categories}
    romcoms = {i for i, f in fields.items() if {"Comedy", "Romance"} <= set(f.categories)}
    history = [pb.HistoryItem(item_id=i) for i in ("m1", "m2", "m3")]
    ranked = ranking(stub, pb.RecommendRequest(history=history, k=42, exclude_history=True))
    position = {item_id: rank for rank, item_id in enumerate(ranked)}
    assert len(space - {"m1", "m2", "m3"}) == 7 and len(romcoms) == 4
    assert max(position[i] for i in space - {"m1", "m2", "m3"}) < min(position[i] for i in romcoms)
    # Zero-shot text similarity: most of the top 5 is science fiction (Aliens, Alien, Terminator 2 here).
    assert sum("Sci-Fi" in fields[i].categories for i in ranked[:5]) >= 3


def test_a_query_alone_steers_the_ranking(stub, tiny_catalogue):
    fields = dict(tiny_catalogue)
    top = ranking(stub, pb.RecommendRequest(context=pb.Context(query="romantic comedy love story"), k=5))
    assert sum("Romance" in fields[i].categories for i in top) >= 3


def test_a_new_user_with_only_a_query_gets_the_animation_titles(stub, tiny_catalogue):
    """Cold start: no history at all, just what the user typed."""
    fields = dict(tiny_catalogue)
    animation = {i for i, f in fields.items() if "Animation" in f.categories}
    top = ranking(stub, pb.RecommendRequest(context=pb.Context(query="animated films for kids"), k=5))
    assert len(animation) == 4 and set(top[:4]) == animation


def test_a_query_steers_a_history_of_comedies_towards_science_fiction(stub, tiny_catalogue):
    fields = dict(tiny_catalogue)
    comedies = [pb.HistoryItem(item_id=i) for i in ("m13", "m14", "m15", "m16")]
    assert all("Comedy" in fields[h.item_id].categories for h in comedies)
    sci_fi = {i for i, f in fields.items() if "Sci-Fi" in f.categories}

    def sci_fi_ranks(query: str) -> list[int]:
        request = pb.RecommendRequest(history=comedies, context=pb.Context(query=query), k=42, exclude_history=True)
        return [rank for rank, item_id in enumerate(ranking(stub, request)) if item_id in sci_fi]

    without, with_query = sci_fi_ranks(""), sci_fi_ranks("space adventure")
    assert sum(with_query) / len(with_query) < sum(without) / len(without) - 3  # clearly higher on average
    assert sum(r < 5 for r in with_query) > sum(r < 5 for r in without)  # and more of them in the top 5
