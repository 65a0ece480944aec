"""clients.client and the `llmrec` CLI against the running test server."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from typer.testing import CliRunner

from llmrec.clients.cli import app
from llmrec.clients.client import RecommenderClient, RecommenderError
from test_fast_path import FAST, HISTORY as FAST_HISTORY

runner = CliRunner()


@pytest.fixture(scope="module")
def client(server):
    with RecommenderClient(server.target, timeout_s=10) as opened:
        yield opened


# --- the Python client ---------------------------------------------------------------------------------


def test_recommend_with_ids_texts_and_context(client):
    result = client.recommend(
        ["m1", {"title": "Gravity (2013)", "categories": ["Sci-Fi", "Space"]}],
        k=7, query="space", device="mobile", locale="en-US", timestamp=dt.datetime(2024, 5, 3, 20, 0),
        utc_offset_minutes=60, exclude=["m2"], exclude_history=True,
    )
    assert len(result.items) == 7 and [i.rank for i in result.items] == list(range(1, 8))
    assert not {"m1", "m2"} & {i.item_id for i in result.items}
    assert result.model_version and result.index_version.startswith(result.model_version)


def test_stream_and_unary_agree(client):
    pages = list(client.recommend_stream(["m1", "m13"], k=12, page_size=5))
    assert [len(p.items) for p in pages] == [5, 5, 2] and pages[-1].last
    assert [i for p in pages for i in p.items] == client.recommend(["m1", "m13"], k=12).items


def test_session_object(client):
    with client.session() as live:
        assert live.configure(k=4).ok
        update = live.interact("m27")
        assert update.ok and update.history_length == 1 and len(update.items) == 4
        assert live.query("space battles").ok
        assert live.set_context(device="tv", query="comedy").ok
        bad = live.interact("missing")
        assert not bad.ok and bad.code_name == "NOT_FOUND" and "missing" in bad.message
        assert live.interact({"title": "Notting Hill (1999)", "categories": ["Romance"]}).history_length == 2


def test_embed_model_info_and_health(client):
    result = client.embed(items=["Star Wars (1977)"], users=[{"history": ["m1"], "query": "space"}])
    assert len(result.items[0]) == 384 and len(result.users[0]) == 384
    info = client.model_info()
    assert info.item_count == 42 and info.model_version == result.model_version
    assert client.health() == "SERVING" and client.health("llmrec.v1.Recommender") == "SERVING"


def test_errors_carry_code_and_message(client):
    with pytest.raises(RecommenderError) as caught:
        client.recommend(["m1"], k=0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k must be" in caught.value.message
    with pytest.raises(ValueError, match="unknown item text fields"):
        client.recommend([{"name": "typo"}])


def test_unreachable_server_is_unavailable():
    with RecommenderClient("127.0.0.1:1", timeout_s=2) as nowhere, pytest.raises(RecommenderError) as caught:
        nowhere.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


# --- the CLI -------------------------------------------------------------------------------------------


def test_cli_recommend_prints_a_table_with_versions(server):
    result = runner.invoke(app, ["recommend", "--target", server.target, "--item", "m1", "--item", "m2",
                                 "--item", "m3", "--k", "10"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "title"]
    rows = [line.split() for line in lines[1:11]]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    assert all(r[1].startswith("m") for r in rows)
    assert "model " in lines[-1] and "index " in lines[-1]
    assert lines[-1].endswith("  path full")  # the tiny bundle has no fast path


def test_cli_recommend_says_which_path_served_and_can_force_the_full_one(serve_bundle, bundle_copy):
    server = serve_bundle(bundle_copy(fast_path=FAST))  # a bundle with fast-path adjustments
    history = [option for item_id in FAST_HISTORY for option in ("--item", item_id)]
    for forced, path in (([], "fast"), (["--force-full-path"], "full")):
        shown = runner.invoke(app, ["recommend", "--target", server.target, *history, "--k", "5", *forced])
        assert shown.exit_code == 0, shown.output
        assert shown.stdout.splitlines()[-1].endswith(f"  path {path}")
        printed = runner.invoke(app, ["recommend", "--target", server.target, *history, "--k", "5", *forced, "--json"])
        assert printed.exit_code == 0, printed.output
        payload = json.loads(printed.stdout)
        assert payload["serving_path"] == path and len(payload["items"]) == 5


def test_cli_recommend_json_honours_options(server):
    result = runner.invoke(app, ["recommend", "--target", server.target, "--item", "m1", "--text", "Gravity (2013)",
                                 "--query", "space", "--device", "tv", "--locale", "en-US", "--k", "5",
                                 "--exclude", "m5", "--exclude-history", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    ids = [i["item_id"] for i in payload["items"]]
    assert len(ids) == 5 and not {"m1", "m5"} & set(ids)
    assert payload["model_version"] and payload["index_version"]


@pytest.mark.parametrize("arguments, expected", [
    (["--item", "nope"], "error: NOT_FOUND: unknown item id 'nope'"),
    ([], "error: INVALID_ARGUMENT: history is empty and no query was given"),
    (["--item", "m1", "--k", "0"], "error: INVALID_ARGUMENT: k must be between 1 and 100"),
])
def test_cli_errors_go_to_stderr_with_a_nonzero_exit(server, arguments, expected):
    result = runner.invoke(app, ["recommend", "--target", server.target, *arguments])
    assert result.exit_code == 3  # a permanent failure
    assert expected in result.stderr and not result.stdout


def test_cli_session_reads_events_from_stdin(server):
    events = "item m1\nquery space adventure\ndevice mobile\nitem nope\nbogus\nk 3\nitem m4\nquit\nitem m2\n"
    result = runner.invoke(app, ["session", "--target", server.target, "--k", "5"], input=events)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("rank  id") == 5  # item, query, device, k 3, item m4 (nothing after quit)
    assert "history 2" in result.stdout and "history 3" not in result.stdout
    assert "error: NOT_FOUND: unknown item id 'nope'" in result.stderr
    assert "not understood: 'bogus'" in result.stderr


def test_cli_info_health_and_embed(server):
    info = runner.invoke(app, ["info", "--target", server.target, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["item_count"] == 42
    health = runner.invoke(app, ["health", "--target", server.target])
    assert health.exit_code == 0 and health.stdout.strip() == "SERVING"
    embed = runner.invoke(app, ["embed", "--target", server.target, "--text", "Alien", "--text", "Heat", "--json"])
    assert embed.exit_code == 0
    assert [len(v["vector"]) for v in json.loads(embed.stdout)["items"]] == [384, 384]


def test_cli_against_no_server():
    result = runner.invoke(app, ["health", "--target", "127.0.0.1:1", "--timeout", "2"])
    assert result.exit_code == 4 and result.stderr.startswith("error: UNAVAILABLE: ")  # retryable
