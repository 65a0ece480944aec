"""`llmrec`: talk to an llmrec server from the shell (recommend, session, items, upsert, delete, info, ...).

Errors print "error: <CODE>: <message>" on stderr, then the field at fault or when to retry if the server says.
`batch` prints each request's error the same way and exits with the worst status among them.

Exit status:
  0  success
  1  health only: the server answered but is not SERVING
  2  usage error: a bad option, argument or input file; nothing was sent
  3  permanent failure: the same call fails again until the request, credentials or server change
     (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED, ALREADY_EXISTS,
     UNIMPLEMENTED, OUT_OF_RANGE, INTERNAL, UNKNOWN, DATA_LOSS)
  4  retryable failure: the same call may succeed later, after the delay the server suggests if any
     (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED, CANCELLED)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, TextIO

import typer
from google.protobuf.json_format import MessageToDict

from llmrec.clients.client import (
    CatalogueItem, Recommendation, RecommenderClient, RecommenderError, SessionUpdate,
)

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)

Target = Annotated[str, typer.Option(envvar="LLMREC_TARGET", help="Server address, host:port.")]
Timeout = Annotated[float, typer.Option(envvar="LLMREC_TIMEOUT", help="Deadline per call, in seconds.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Explain = Annotated[bool, typer.Option("--explain", help="Say why each item is recommended.")]
Category = Annotated[list[str] | None, typer.Option(
    "--category", help="Only items in this category (repeatable: any of them).")]
Attr = Annotated[list[str] | None, typer.Option(
    "--attr", help="Only items with this attribute, KEY=VALUE (repeatable: every key must match, any value).")]
Reject = Annotated[list[str] | None, typer.Option(
    "--reject", help="An item id the user rejected (repeatable): never returned, and items like it move down.")]
MinScore = Annotated[float | None, typer.Option(
    "--min-score", help="Only items scoring at least this (the list may be shorter than k).")]

DEFAULT_TARGET = "127.0.0.1:50051"

# Global connection options, before the command: `llmrec --tls-ca ca.pem --token ... recommend --item 50`
# (or LLMREC_TLS_CA, LLMREC_TOKEN, ... anywhere). Prefer LLMREC_TOKEN: a --token value shows up in `ps`.
PemFile = dict(exists=True, dir_okay=False, readable=True)
TlsCa = Annotated[Path | None, typer.Option(
    envvar="LLMREC_TLS_CA", help="Use TLS, trusting this CA (PEM) for the server's certificate.", **PemFile)]
TlsCert = Annotated[Path | None, typer.Option(
    envvar="LLMREC_TLS_CERT", help="Client certificate (PEM) for mutual TLS; implies TLS.", **PemFile)]
TlsKey = Annotated[Path | None, typer.Option(
    envvar="LLMREC_TLS_KEY", help="The client certificate's private key (PEM).", **PemFile)]
Token = Annotated[str | None, typer.Option(
    envvar="LLMREC_TOKEN", show_default=False, help="Bearer token sent with every call (prefer LLMREC_TOKEN).")]
ClientId = Annotated[str | None, typer.Option(
    envvar="LLMREC_CLIENT_ID", show_default=False,
    help="Who this caller is for the server's per-client fair sharing when authorization is off.")]

_connection: dict = {}


@app.callback()
def _connection_options(tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
                        token: Token = None, client_id: ClientId = None) -> None:
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give --tls-cert and --tls-key together", param_hint="--tls-cert/--tls-key")
    _connection.clear()
    _connection.update(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token or None,
                       client_id=client_id or None)


def _connect(target: str, timeout: float) -> RecommenderClient:
    """A client for `target` with the global connection options."""
    return RecommenderClient(target, timeout_s=timeout, **_connection)


SESSION_HELP = """\
session commands, one per line:
  item ID            the user interacted with a catalogue item
  text TITLE         the user interacted with an item the catalogue lacks
  query TEXT         set the query (just `query` clears it)
  device NAME        set the device (e.g. mobile); keeps query and locale
  locale TAG         set the locale (e.g. en-US); keeps query and device
  k N                return N items
  exclude ID         never return this item
  reject ID          the user rejected this item: never return it, and move items like it down
  min-score X        only items scoring at least X (just `min-score` clears it)
  exclude-history    stop returning items already in the history
  help               this text
  quit               end the session"""


EXIT_NOT_SERVING = 1
EXIT_PERMANENT = 3
EXIT_RETRYABLE = 4


def exit_code(error: RecommenderError) -> int:
    """EXIT_RETRYABLE for codes in client.RETRYABLE_CODES, EXIT_PERMANENT for every other failure."""
    return EXIT_RETRYABLE if error.retryable else EXIT_PERMANENT


def _fail(error: RecommenderError) -> None:
    _print_error(error)
    raise typer.Exit(code=exit_code(error))


def _print_error(error: RecommenderError, prefix: str = "") -> None:
    typer.echo(f"{prefix}error: {error.code.name}: {error.message}", err=True)
    for violation in error.field_violations:
        typer.echo(f"  field: {violation.field}", err=True)
    if error.retryable and error.retry_after_s is not None:
        typer.echo(f"  retry after {error.retry_after_s:g} s", err=True)


def format_items(items: Sequence[Recommendation]) -> str:
    """A plain-text table: rank, id, score, title (and, when explained, the reason under each row)."""
    if not items:
        return "(no items)"
    id_width = max(len("id"), *(len(i.item_id) for i in items))
    lines = [f"{'rank':>4}  {'id':<{id_width}}  {'score':>8}  title"]
    for i in items:
        lines.append(f"{i.rank:>4}  {i.item_id:<{id_width}}  {i.score:>8.4f}  {i.title}")
        if i.explanation is not None:
            lines.append(f"{'':>4}  {'':<{id_width}}  {'':>8}  {i.explanation.summary}")
    return "\n".join(lines)


def parse_filters(attr: Sequence[str]) -> dict[str, list[str]]:
    """KEY=VALUE options -> {key: [values]}; exits with a usage error on a malformed one."""
    filters: dict[str, list[str]] = {}
    for option in attr:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{option!r} is not KEY=VALUE", param_hint="--attr")
        filters.setdefault(key.strip(), []).append(value.strip())
    return filters


@app.command()
def recommend(
    target: Target = DEFAULT_TARGET,
    item: Annotated[list[str] | None, typer.Option(
        help="A catalogue item id in the history (repeatable, oldest first).")] = None,
    text: Annotated[list[str] | None, typer.Option(
        help="The title of an item the catalogue lacks, added after the --item ids (repeatable).")] = None,
    query: Annotated[str, typer.Option(help="Free text the user typed.")] = "",
    device: Annotated[str, typer.Option(help="Device, e.g. mobile, desktop, tv.")] = "",
    locale: Annotated[str, typer.Option(help="BCP 47 locale, e.g. en-US.")] = "",
    k: Annotated[int, typer.Option(help="How many items to return.")] = 10,
    exclude: Annotated[list[str] | None, typer.Option(help="An item id never to return (repeatable).")] = None,
    exclude_history: Annotated[bool, typer.Option(
        "--exclude-history", help="Do not return items that are in the history.")] = False,
    explain: Explain = False,
    category: Category = None,
    attr: Attr = None,
    reject: Reject = None,
    min_score: MinScore = None,
    force_full_path: Annotated[bool, typer.Option(
        "--force-full-path", help="Run the model's encoder even where the fast path would serve (the output says "
                                  "which path did: fast or full).")] = False,
    ranking_stage: Annotated[bool | None, typer.Option(
        "--ranking-stage/--no-ranking-stage", help="Re-score the list with the model's cross-encoder, or not "
                                                   "(default: the server's setting).")] = None,
    json_output: Json = False,
    timeout: Timeout = 10.0,
) -> None:
    """Recommend items for a history and context (a query alone is enough for a new user)."""
    history = [*(item or []), *({"title": t} for t in (text or []))]
    filters = parse_filters(attr or [])
    try:
        with _connect(target, timeout) as client:
            result = client.recommend(history, k=k, query=query, device=device, locale=locale,
                                      exclude=exclude or [], exclude_history=exclude_history, explain=explain,
                                      filters=filters, category=category or [], rejected=reject or [],
                                      min_score=min_score, force_full_path=force_full_path,
                                      ranking_stage=ranking_stage)
    except RecommenderError as error:
        _fail(error)
    if json_output:  # serving_path among the fields
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    typer.echo(format_items(result.items))
    path = f"  path {result.serving_path}" if result.serving_path else ""  # "": a server too old to say
    typer.echo(f"\nmodel {result.model_version}  index {result.index_version}{path}")


_BATCH_KEYS = {"history", "k", "query", "device", "locale", "timestamp", "utc_offset_minutes", "exclude",
               "exclude_history", "explain", "filters", "category", "rejected", "min_score"}


@app.command()
def batch(
    file: Annotated[typer.FileText, typer.Argument(
        help='JSON lines, one request each: recommend()\'s arguments, e.g. {"history": ["50", {"title": "Alien"}], '
             '"k": 5, "query": "...", "rejected": ["172"], "min_score": 0.3} ("-" for stdin).')],
    target: Target = DEFAULT_TARGET,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per request.")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Recommend for many users in one RecommendBatch call; a bad request fails only its own entry.

    Exits 0 when every request succeeded, else with the worst status among them (3 over 4).
    """
    requests: list[dict] = []
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(f"line {number} is not JSON ({error})", param_hint="FILE") from None
        unknown = set(request) - _BATCH_KEYS if isinstance(request, dict) else {"(not an object)"}
        if unknown:
            raise typer.BadParameter(f"line {number}: unknown fields {sorted(unknown)}; use {sorted(_BATCH_KEYS)}",
                                     param_hint="FILE")
        requests.append(request)
    if not requests:
        raise typer.BadParameter("the file holds no requests", param_hint="FILE")
    try:
        with _connect(target, timeout) as client:
            result = client.recommend_batch(requests)
    except RecommenderError as error:
        _fail(error)
    except ValueError as error:  # a malformed history entry in a request
        raise typer.BadParameter(str(error), param_hint="FILE") from None
    failures = [entry.error for entry in result.results if entry.error is not None]
    for number, entry in enumerate(result.results):
        if json_output:
            record = {"request": number, "items": [dataclasses.asdict(i) for i in entry.items]}
            if entry.error is not None:
                record["error"] = {"code": entry.error.code.name, "message": entry.error.message,
                                   "fields": [v.field for v in entry.error.field_violations]}
            typer.echo(json.dumps(record))
        elif entry.error is not None:
            _print_error(entry.error, prefix=f"request {number}: ")
        else:
            typer.echo(f"request {number}:\n{format_items(entry.items)}")
    if not json_output:
        typer.echo(f"\nmodel {result.model_version}  index {result.index_version}")
    if failures:
        raise typer.Exit(code=EXIT_RETRYABLE if all(error.retryable for error in failures) else EXIT_PERMANENT)


@app.command()
def session(
    target: Target = DEFAULT_TARGET,
    k: Annotated[int, typer.Option(help="How many items to return after each event.")] = 10,
    exclude_history: Annotated[bool, typer.Option(
        "--exclude-history", help="Do not return items that are in the history.")] = False,
    explain: Explain = False,
    category: Category = None,
    attr: Attr = None,
    timeout: Timeout = 10.0,
) -> None:
    """A live session: read events from stdin, one a line, and print the updated list after each.

    The session id goes to stderr first: `llmrec forget ID` from another shell ends the session and drops it.
    """
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(SESSION_HELP)
    filters = parse_filters(attr or [])
    try:
        with _connect(target, timeout) as client, client.session() as live:
            state = {"k": k, "exclude": [], "exclude_history": exclude_history, "query": "", "device": "",
                     "locale": "", "explain": explain, "filters": filters, "category": category or [],
                     "min_score": None}
            first = live.configure(k=k, exclude_history=exclude_history, explain=explain, filters=filters,
                                   category=category or [])
            typer.echo(f"session {live.session_id}", err=True)
            _print_update(first, show_empty=False)
            for line in _lines(sys.stdin, interactive):
                update = _session_event(live, state, line)
                if update is _QUIT:
                    break
                if update is not None:
                    _print_update(update)
    except RecommenderError as error:
        _fail(error)


_QUIT = object()


def _lines(stream: TextIO, prompt: bool) -> Iterator[str]:
    while True:
        if prompt:
            typer.echo("> ", nl=False)
        line = stream.readline()
        if not line:
            return
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def _session_event(live, state: dict, line: str):
    """Send the event a stdin line describes; None when the line was not an event (help, usage errors)."""
    command, _, argument = line.partition(" ")
    command, argument = command.lower(), argument.strip()
    if command in ("quit", "exit"):
        return _QUIT
    if command == "help":
        typer.echo(SESSION_HELP)
        return None
    if command == "item" and argument:
        return live.interact(argument)
    if command == "text" and argument:
        return live.interact({"title": argument})
    if command == "reject" and argument:
        return live.reject(argument)
    if command == "query":
        state["query"] = argument
        return live.query(argument)
    if command in ("device", "locale"):
        state[command] = argument
        return live.set_context(query=state["query"], device=state["device"], locale=state["locale"])
    if command in ("k", "exclude", "exclude-history", "min-score"):
        if command == "k":
            if not argument.isdigit():
                typer.echo("usage: k N", err=True)
                return None
            state["k"] = int(argument)
        elif command == "min-score":
            try:
                state["min_score"] = float(argument) if argument else None
            except ValueError:
                typer.echo("usage: min-score X (a number; none clears it)", err=True)
                return None
        elif command == "exclude":
            if not argument:
                typer.echo("usage: exclude ID", err=True)
                return None
            state["exclude"].append(argument)
        else:
            state["exclude_history"] = True
        return live.configure(k=state["k"], exclude=state["exclude"], exclude_history=state["exclude_history"],
                              explain=state["explain"], filters=state["filters"], category=state["category"],
                              min_score=state["min_score"])
    typer.echo(f"not understood: {line!r} (type `help`)", err=True)
    return None


def _print_update(update: SessionUpdate, show_empty: bool = True) -> None:
    if not update.ok:
        typer.echo(f"event {update.event_id}: error: {update.code_name}: {update.message}", err=True)
        return
    if update.items or show_empty:
        typer.echo(f"event {update.event_id}: history {update.history_length}")
        typer.echo(update.message if not update.items and update.message else format_items(update.items))


@app.command()
def info(target: Target = DEFAULT_TARGET, json_output: Json = False, timeout: Timeout = 10.0) -> None:
    """Show the served model, index and limits."""
    try:
        with _connect(target, timeout) as client:
            response = client.model_info()
    except RecommenderError as error:
        _fail(error)
    fields = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if json_output:
        typer.echo(json.dumps(fields, indent=2))
        return
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        typer.echo(f"{name:<{width}}  {value}")


@app.command()
def health(
    target: Target = DEFAULT_TARGET,
    service: Annotated[str, typer.Option(help='Service to ask about; "" is the whole server.')] = "",
    timeout: Timeout = 10.0,
) -> None:
    """Print the health status; exit 0 only when SERVING."""
    try:
        with _connect(target, timeout) as client:
            status = client.health(service)
    except RecommenderError as error:
        _fail(error)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(code=EXIT_NOT_SERVING)


@app.command()
def embed(
    text: Annotated[list[str], typer.Option(help="An item title to embed (repeatable).")],
    target: Target = DEFAULT_TARGET,
    json_output: Json = False,
    timeout: Timeout = 10.0,
) -> None:
    """Embed item titles: print each vector's size and first values (all of them with --json)."""
    try:
        with _connect(target, timeout) as client:
            result = client.embed(items=[{"title": t} for t in text])
    except RecommenderError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps({"model_version": result.model_version,
                               "items": [{"text": t, "vector": v} for t, v in zip(text, result.items)]}))
        return
    for title, vector in zip(text, result.items):
        head = ", ".join(f"{x:+.4f}" for x in vector[:4])
        typer.echo(f"{title}: dim {len(vector)}  [{head}, ...]")
    typer.echo(f"model {result.model_version}")


@app.command("load-model")
def load_model(
    bundle_path: Annotated[str, typer.Argument(
        help="A bundle directory on the server; omitted: the newest bundle under the server's --bundle-root.")] = "",
    target: Target = DEFAULT_TARGET,
    json_output: Json = False,
    timeout: Annotated[float, typer.Option(help="Deadline for the whole swap, in seconds.")] = 600.0,
) -> None:
    """Admin: hot-swap the served model for another bundle (load, verify, warm up, carry catalogue changes over)."""
    try:
        with _connect(target, timeout) as client:
            response = client.load_model(bundle_path, timeout_s=timeout)
    except RecommenderError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps(MessageToDict(response, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True), indent=2))
    elif response.swapped:
        typer.echo(f"serving {response.model_version} (was {response.previous_model_version}) after "
                   f"{response.swap_seconds:.2f} s; {response.carried_changes} catalogue changes carried over")
    else:
        typer.echo(f"already serving {response.model_version}; nothing changed")


@app.command()
def forget(
    session_id: Annotated[str, typer.Argument(help="The id a session printed (SessionResponse.session_id).")],
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = 10.0,
) -> None:
    """End a live session and drop everything the server holds for it."""
    try:
        with _connect(target, timeout) as client:
            client.forget_session(session_id)
    except RecommenderError as error:
        _fail(error)
    typer.echo(f"forgot session {session_id}")


# --- catalogue ---------------------------------------------------------------------------------------------


def _item_record(item: CatalogueItem) -> dict:
    record = dataclasses.asdict(item)
    if record["vector"] is None:
        del record["vector"]
    return record


@app.command()
def upsert(
    target: Target = DEFAULT_TARGET,
    item_id: Annotated[str, typer.Option("--id", help="The item's id (with --title).")] = "",
    title: Annotated[str, typer.Option(help="The item's title, e.g. \"Arrival (2016)\".")] = "",
    category: Annotated[list[str] | None, typer.Option("--category", help="A category (repeatable).")] = None,
    brand: Annotated[str, typer.Option(help="Brand or maker.")] = "",
    description: Annotated[str, typer.Option(help="A short description.")] = "",
    attr: Annotated[list[str] | None, typer.Option(
        "--attr", help="An attribute KEY=VALUE for filtering (repeatable).")] = None,
    file: Annotated[typer.FileText | None, typer.Option(
        help='JSON lines, one item each: {"id", "title", "categories", "brand", "description", "attributes"} '
             '("-" for stdin).')] = None,
    batch_size: Annotated[int, typer.Option(help="Items per UpsertItems call with --file.")] = 500,
    timeout: Timeout = 60.0,
) -> None:
    """Add or replace catalogue items (one from options, or many from --file); durable once it prints."""
    items: list[dict] = []
    if item_id or title:
        attributes = {k: v[-1] for k, v in parse_filters(attr or []).items()}
        items.append({"id": item_id, "title": title, "categories": category or [], "brand": brand,
                      "description": description, "attributes": attributes})
    if file is not None:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise typer.BadParameter(f"line {number} is not JSON ({error})", param_hint="--file") from None
    if not items:
        raise typer.BadParameter("give --id and --title, or --file", param_hint="--id")
    created = replaced = 0
    try:
        with _connect(target, timeout) as client:
            for start in range(0, len(items), max(batch_size, 1)):
                change = client.upsert_items(items[start : start + max(batch_size, 1)])
                created, replaced = created + change.created, replaced + change.replaced
    except RecommenderError as error:
        _fail(error)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"created {created}, replaced {replaced}; {change.item_count} items, index {change.index_version}")


@app.command()
def delete(
    item_ids: Annotated[list[str], typer.Argument(help="Ids of the items to delete.")],
    target: Target = DEFAULT_TARGET,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Skip unknown ids instead of failing (and deleting nothing).")] = False,
    timeout: Timeout = 10.0,
) -> None:
    """Delete catalogue items; durable once it prints."""
    try:
        with _connect(target, timeout) as client:
            change = client.delete_items(item_ids, allow_missing=allow_missing)
    except RecommenderError as error:
        _fail(error)
    typer.echo(f"deleted {change.deleted}; {change.item_count} items, index {change.index_version}")


@app.command()
def item(
    item_id: Annotated[str, typer.Argument(help="The item's id.")],
    target: Target = DEFAULT_TARGET,
    vector: Annotated[bool, typer.Option("--vector", help="Include the index row (with --json).")] = False,
    json_output: Json = False,
    timeout: Timeout = 10.0,
) -> None:
    """Show one catalogue item."""
    try:
        with _connect(target, timeout) as client:
            found = client.get_item(item_id, include_vector=vector)
    except RecommenderError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps(_item_record(found), ensure_ascii=False))
        return
    for name, value in _item_record(found).items():
        if name != "vector":
            typer.echo(f"{name:<12} {value}")


@app.command()
def items(
    target: Target = DEFAULT_TARGET,
    page_size: Annotated[int, typer.Option(help="Items per page (0 = the server default).")] = 0,
    page_token: Annotated[str, typer.Option(help="Continue from a previous page's token.")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="Every page, not just one.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per item.")] = False,
    timeout: Timeout = 10.0,
) -> None:
    """List the live catalogue in id order: one page (its next token goes to stderr) or --all."""
    try:
        with _connect(target, timeout) as client:
            token = page_token
            while True:
                page = client.list_items(page_size, token)
                for entry in page.items:
                    if json_output:
                        typer.echo(json.dumps(_item_record(entry), ensure_ascii=False))
                    else:
                        typer.echo(f"{entry.item_id}\t{entry.title}\t{', '.join(entry.categories)}")
                token = page.next_page_token
                if not all_pages or not token:
                    break
    except RecommenderError as error:
        _fail(error)
    typer.echo(f"{page.total_count} items" + (f"; next page: --page-token {token}" if token else ""), err=True)
