"""clients.client and the `llmrec` CLI for catalogue changes, explanations, filters and ForgetSession."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from bench import session_bench
from llmrec.clients.cli import app
from llmrec.clients.client import RecommenderClient, RecommenderError

runner = CliRunner()


@pytest.fixture(scope="module")
def client(state_server):
    with RecommenderClient(state_server.target, timeout_s=10) as opened:
        yield opened


def test_client_catalogue_round_trip(client):
    change = client.upsert_items([{"id": "c-arrival", "title": "Arrival (2016)", "categories": ["Sci-Fi"],
                                   "description": "A linguist decodes an alien language.",
                                   "attributes": {"studio": "Paramount"}}])
    assert (change.created, change.replaced, change.item_count) == (1, 0, 43)
    item = client.get_item("c-arrival", include_vector=True)
    assert item.title == "Arrival (2016)" and item.attributes == {"studio": "Paramount"} and item.upserted
    assert len(item.vector) == 385
    assert client.get_item("m1").vector is None and not client.get_item("m1").upserted
    everything = list(client.iter_items(page_size=5))
    assert len(everything) == 43 and "c-arrival" in {i.item_id for i in everything}
    page = client.list_items(page_size=40)
    assert len(page.items) == 40 and page.next_page_token and page.total_count == 43
    filtered = client.recommend(query="alien language", k=1, filters={"studio": "paramount"})
    assert filtered.items[0].item_id == "c-arrival"
    deleted = client.delete_items(["c-arrival"])
    assert deleted.deleted == 1 and deleted.item_count == 42
    with pytest.raises(RecommenderError) as caught:
        client.get_item("c-arrival")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="unknown catalogue item fields"):
        client.upsert_items([{"id": "x", "name": "typo"}])


def test_client_explanations_categories_and_forget(client):
    result = client.recommend(["m1", "m2"], k=3, explain=True, exclude_history=True, category=["Sci-Fi"])
    assert len(result.items) == 3
    for item in result.items:
        assert item.explanation.reasons[0].kind == "history_item"
        assert item.explanation.summary.startswith("Because you liked")
    with client.session() as live:
        update = live.configure(k=2, explain=True, history=["m27"], category="Romance")
        assert update.ok and update.session_id == live.session_id and live.session_id
        assert all(i.explanation is not None for i in update.items)
        client.forget_session(live.session_id)
        with pytest.raises(RecommenderError) as caught:
            live.interact("m1")
        assert caught.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(RecommenderError) as unknown:
        client.forget_session("no-such-session")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def test_cli_upsert_items_item_delete(state_server, tmp_path):
    target = ["--target", state_server.target]
    one = runner.invoke(app, ["upsert", *target, "--id", "cli-1", "--title", "Paddington (2014)",
                              "--category", "Children's", "--category", "Comedy", "--attr", "studio=StudioCanal"])
    assert one.exit_code == 0, one.output
    assert one.stdout.startswith("created 1, replaced 0; 43 items")
    lines = tmp_path / "items.jsonl"
    lines.write_text('{"id": "cli-2", "title": "Paddington 2 (2017)", "categories": ["Comedy"]}\n\n'
                     '{"id": "cli-1", "title": "Paddington (2014)", "attributes": {"studio": "StudioCanal"}}\n')
    many = runner.invoke(app, ["upsert", *target, "--file", str(lines), "--batch-size", "1"])
    assert many.exit_code == 0 and many.stdout.startswith("created 1, replaced 1; 44 items")
    shown = runner.invoke(app, ["item", *target, "cli-1", "--json", "--vector"])
    record = json.loads(shown.stdout)
    assert record["attributes"] == {"studio": "StudioCanal"} and len(record["vector"]) == 385
    listed = runner.invoke(app, ["items", *target, "--page-size", "10", "--all"])
    assert listed.exit_code == 0 and len(listed.stdout.splitlines()) == 44 and "44 items" in listed.stderr
    page = runner.invoke(app, ["items", *target, "--page-size", "10", "--json"])
    assert len(page.stdout.splitlines()) == 10 and "--page-token" in page.stderr
    explained = runner.invoke(app, ["recommend", *target, "--query", "bear", "--attr", "studio=studiocanal",
                                    "--explain", "--k", "5"])
    assert explained.exit_code == 0 and "Paddington" in explained.stdout and "Because you asked for" in explained.stdout
    category = runner.invoke(app, ["recommend", *target, "--item", "m1", "--category", "Animation", "--json"])
    assert {i["item_id"] for i in json.loads(category.stdout)["items"]} == {"m23", "m24", "m25", "m26"}
    gone = runner.invoke(app, ["delete", *target, "cli-1", "cli-2", "nope"])
    assert gone.exit_code == 3 and "error: NOT_FOUND: unknown item id 'nope'" in gone.stderr
    gone = runner.invoke(app, ["delete", *target, "cli-1", "cli-2", "nope", "--allow-missing"])
    assert gone.exit_code == 0 and gone.stdout.startswith("deleted 2; 42 items")
    bad = runner.invoke(app, ["recommend", *target, "--item", "m1", "--attr", "novalue"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_cli_read_only_server_and_forget(server):
    refused = runner.invoke(app, ["upsert", "--target", server.target, "--id", "x", "--title", "X"])
    assert refused.exit_code == 3 and "error: FAILED_PRECONDITION:" in refused.stderr
    forgot = runner.invoke(app, ["forget", "--target", server.target, "nobody"])
    assert forgot.exit_code == 3 and "error: NOT_FOUND" in forgot.stderr
    session = runner.invoke(app, ["session", "--target", server.target, "--explain", "--category", "Comedy"],
                            input="item m13\nquit\n")
    assert session.exit_code == 0 and session.stderr.startswith("session ")
    assert "Because you liked Groundhog Day (1993)" in session.stdout


def test_session_bench_writes_percentiles(server, tmp_path):
    out = tmp_path / "bench.json"
    report = session_bench.main(["--target", server.target, "--sessions", "1,3", "--events", "4", "--warmup", "1",
                                 "--reuse-events", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert [level["sessions"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        interaction = level["interaction"]
        assert interaction["count"] == 4 * level["sessions"]
        assert 0 < interaction["p50_ms"] <= interaction["p99_ms"] <= interaction["max_ms"]
        assert level["reuse_cached_vector"]["count"] == 2 * level["sessions"]
