"""Property-based requests against a real server process: every RPC's request messages drawn from the proto
descriptors (random, extreme, long, unicode and missing fields), plus raw garbage bytes on every method.

Asserted for every request: it returns before its deadline (no hang) with a status code documented for its RPC
(never INTERNAL or UNKNOWN), and a Session answers every event with a documented per-event code. Asserted after
each test: the process is alive and reports SERVING. Failures are collected (not raised at the first) so that the
report counts them all; the test then fails listing them.

Size: LLMREC_FUZZ_EXAMPLES requests in all (200 in `make test`, 5,000 in `make fuzz`), reported in fuzz.json.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmrec.item_record import read_items
from llmrec.v1 import recommender_pb2 as pb

from fault_helpers import CALL_TIMEOUT_S, ServerProcess, report_dir, size, write_report

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
METHODS = [method.name for method in SERVICE.methods]
TOTAL = size("LLMREC_FUZZ_EXAMPLES", 200)
GARBAGE_SHARE = 0.15  # of TOTAL: raw bytes on a random method; the rest is split evenly over the RPCs
# A request type without fields (GetModelInfoRequest) has one possible message: it gets one example.
EMPTY = [m.name for m in SERVICE.methods if not m.input_type.fields]
PER_METHOD = max(1, round(TOTAL * (1 - GARBAGE_SHARE) / (len(METHODS) - len(EMPTY))))
GARBAGE = max(1, TOTAL - PER_METHOD * (len(METHODS) - len(EMPTY)) - len(EMPTY))

C = grpc.StatusCode
# Documented outcomes per RPC while SERVING (proto comments, server/errors.py). RESOURCE_EXHAUSTED everywhere: the
# message size, concurrent-RPC and queue limits apply to every call. UNAVAILABLE nowhere: the server is loaded and
# its storage healthy. INTERNAL and UNKNOWN never: they mean a bug.
COMMON = {C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    # FAILED_PRECONDITION: ranking_stage asked of a model without one (the fuzz server's has none).
    "Recommend": COMMON | {C.NOT_FOUND, C.FAILED_PRECONDITION},
    "RecommendStream": COMMON | {C.NOT_FOUND, C.FAILED_PRECONDITION},
    "RecommendBatch": COMMON,  # each request's own outcome is in its entry: EVENT_CODES
    # Session: idle timeout (DEADLINE_EXCEEDED), ForgetSession (ABORTED), too many sessions (RESOURCE_EXHAUSTED).
    "Session": COMMON | {C.DEADLINE_EXCEEDED, C.ABORTED},
    "Embed": COMMON | {C.NOT_FOUND},
    "GetModelInfo": COMMON,
    "ForgetSession": COMMON | {C.NOT_FOUND},
    "UpsertItems": COMMON,
    "DeleteItems": COMMON | {C.NOT_FOUND},
    "GetItem": COMMON | {C.NOT_FOUND},
    "ListItems": COMMON,
    # LoadModel: a path that is not a servable bundle (FAILED_PRECONDITION, the old model serves on), another load
    # running (ABORTED).
    "LoadModel": COMMON | {C.FAILED_PRECONDITION, C.ABORTED},
}
# SessionResponse.status.code of one event, and RecommendBatchResult.status.code of one request: OK,
# INVALID_ARGUMENT, NOT_FOUND, the encoder queue being full, or (a batch request) a ranking stage the model lacks.
EVENT_CODES = {0, 3, 5, 8, 9}
assert set(ALLOWED) == set(METHODS), "a new RPC needs its documented codes here"

TINY_IDS = [item_id for item_id, _ in read_items(Path(__file__).parents[1] / "fixtures" / "tiny" / "items.jsonl")]
SPECIAL_TEXT = TINY_IDS[:8] + ["", " ", "\x00", "\t\n", "m1 ", "M1", "category", "Action", "sci-fi", "🎬🍿",
                               "\u202eRTL", "\u200b", "Ωmega – ünïcode", "a" * 2001, "%s%n{0}", "../../etc/passwd"]
EDGE_INTS = [0, 1, -1, 2, 10, 100, 101, 1000, 1001, 2**31 - 1, -(2**31)]


def text(long: bool = True) -> st.SearchStrategy[str]:
    """Known ids and awkward strings, random unicode, and (only where `long`) strings past max_text_chars."""
    options = [st.sampled_from(SPECIAL_TEXT), st.text(max_size=30)]
    if long:
        options.append(st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=6),
                                 st.integers(300, 3000)))
    return st.one_of(*options)


def scalar(field: FieldDescriptor, long: bool = True) -> st.SearchStrategy:
    kind = field.type
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**31), 2**31 - 1))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(EDGE_INTS + [2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return text(long)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers must be handled too
        return st.one_of(st.sampled_from([value.number for value in field.enum_type.values]), st.integers(-3, 99))
    raise AssertionError(f"no strategy for field {field.full_name}")


def repeated(element: st.SearchStrategy, big: bool) -> st.SearchStrategy[list]:
    """Mostly short lists; where `big`, sometimes one past the per-request limits (a short list repeated 150 to
    1,200 times: max_request_history is 500, max_catalogue_batch 1,000). Only top-level fields are big, and their
    elements are kept short, so a request stays a few MB at most."""
    if not big:
        return st.lists(element, max_size=4)
    return st.one_of(st.lists(element, max_size=4),
                     st.tuples(st.lists(element, min_size=1, max_size=2), st.integers(150, 1200))
                     .map(lambda pair: pair[0] * pair[1]))


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def plausible(field: FieldDescriptor) -> st.SearchStrategy:
    """Values a well-behaved client might send, so that requests also get past validation into the core."""
    kind = field.type
    if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                          FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64):
        return st.integers(1, 12)
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(-2, 2, width=32)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(TINY_IDS), st.sampled_from(["Action", "space", "a film", "en-US"]),
                         st.text(min_size=1, max_size=12))
    return scalar(field, long=False)


@st.composite
def message(draw, descriptor: Descriptor, depth: int = 0, small: bool = False, tame: bool | None = None):
    """A message of any type in the proto: each field missing or set, recursively (depth-limited). Inside the
    elements of a big top-level list everything is `small` (no long strings, no big lists). Half the top-level
    draws are `tame`: plausible values only, so that the fuzz reaches past validation too."""
    if tame is None:
        tame = draw(st.booleans())
    msg = message_factory.GetMessageClass(descriptor)()
    # Tame messages set one member of each oneof and most other fields; wild ones any subset.
    chosen = {oneof.name: draw(st.sampled_from([f.name for f in oneof.fields])) for oneof in descriptor.oneofs} \
        if tame else {}
    for field in descriptor.fields:
        if tame and field.containing_oneof is not None:
            if chosen[field.containing_oneof.name] != field.name:
                continue
        elif not draw(st.integers(0, 4) if tame else st.integers(0, 1)):
            continue  # a missing field
        if tame and field.type != FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            values = plausible(field)
            if field.is_repeated:
                getattr(msg, field.name).extend(draw(st.lists(values, max_size=4)))
            else:
                setattr(msg, field.name, draw(values))
            continue
        big = depth == 0 and not tame and draw(st.integers(0, 9)) == 0  # one top-level list in ten may be huge
        long = not small and not tame
        if _is_map(field):
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            keys, values = (plausible(key), plausible(value)) if tame else (scalar(key, long), scalar(value, long))
            entries = draw(st.dictionaries(keys, values, max_size=4))
            getattr(msg, field.name).update(entries)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            element = message(field.message_type, depth + 1, small or big, tame)
            if field.is_repeated:
                for value in draw(repeated(element, big)):
                    getattr(msg, field.name).add().CopyFrom(value)
            else:
                getattr(msg, field.name).CopyFrom(draw(element))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(repeated(scalar(field, long and not big), big)))
        else:
            setattr(msg, field.name, draw(scalar(field, long)))
    return msg


class Tally:
    """Requests tried and failures found, per method (thread-safe: hypothesis runs in the test thread only, but
    the report is written from the fixture)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = collections.Counter()
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[dict] = []

    def record(self, method: str, code: grpc.StatusCode, problem: str | None, request: str, kind: str) -> None:
        with self.lock:
            self.requests[method] += 1
            self.codes[method][code.name] += 1
            if problem is not None:
                self.failures.append({"method": method, "kind": kind, "code": code.name, "problem": problem[:500],
                                      "request": request[:500]})


TALLY = Tally()


@pytest.fixture(scope="module")
def fuzz_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess(tiny_bundle, work / "server.log", work / "state", "--snapshot-every", "50",
                           "--session-idle-timeout-s", "30").start()
    server.wait_serving()
    rss_start = server.rss_kb()
    yield server
    alive = server.alive()
    health = server.health() if alive else "DEAD"
    rss_end = server.rss_kb() if alive else None
    code = server.stop()
    log = server.run_log()
    report = {
        "examples_configured": TOTAL, "requests": sum(TALLY.requests.values()),
        "requests_by_method": dict(TALLY.requests), "codes_by_method": {m: dict(c) for m, c in TALLY.codes.items()},
        "failures": len(TALLY.failures), "failure_samples": TALLY.failures[:20],
        "server_alive_at_end": alive, "health_at_end": health, "exit_code_after_sigterm": code,
        "tracebacks_in_log": log.count("Traceback"), "rss_kb": {"start": rss_start, "end": rss_end},
    }
    write_report(report_dir(work), "fuzz.json", report)


def call(server: ServerProcess, channel: grpc.Channel, method: str, request, raw: bool = False):
    """Send one request (a message, or bytes when raw) and return (code, problem or None). Never hangs: every call
    carries a deadline, and streams are read to their end within it."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    serialize = None if raw else (lambda m: m.SerializeToString())
    output = message_factory.GetMessageClass(descriptor.output_type)
    problems: list[str] = []
    try:
        if descriptor.client_streaming:  # Session: a few events, then half-close
            events = request if isinstance(request, list) else [request]
            responses = channel.stream_stream(path, request_serializer=serialize,
                                              response_deserializer=output.FromString)(iter(events),
                                                                                      timeout=CALL_TIMEOUT_S)
            for response in responses:
                if response.status.code not in EVENT_CODES:
                    problems.append(f"event {response.event_id!r} answered with code {response.status.code}: "
                                    f"{response.status.message}")
        elif descriptor.server_streaming:
            for _ in channel.unary_stream(path, request_serializer=serialize,
                                          response_deserializer=output.FromString)(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            response = channel.unary_unary(path, request_serializer=serialize,
                                           response_deserializer=output.FromString)(request, timeout=CALL_TIMEOUT_S)
            for number, result in enumerate(getattr(response, "results", ())):  # RecommendBatch
                if result.status.code not in EVENT_CODES:
                    problems.append(f"request {number} answered with code {result.status.code}: "
                                    f"{result.status.message}")
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and method != "Session":
        problems.append(f"no answer within {CALL_TIMEOUT_S} s (a hang)")
    elif code not in ALLOWED[method]:
        problems.append(f"undocumented status {code.name}: {details}")
    if not server.alive():
        problems.append("the server process died")
    return code, "; ".join(problems) or None


def _describe(request) -> str:
    if isinstance(request, (bytes, bytearray)):
        return f"raw {len(request)} bytes: {bytes(request[:80])!r}"
    if isinstance(request, list):
        return json.dumps([str(r)[:150] for r in request])
    return str(request)[:500]


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                     suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    limit = 64 * 1024 * 1024  # larger than the server's: its own limit must answer, not ours
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(fuzz_server.target, options=options) as open_channel:
        yield open_channel


def requests_for(method: str) -> st.SearchStrategy:
    descriptor = SERVICE.methods_by_name[method]
    one = message(descriptor.input_type)
    return st.lists(one, min_size=1, max_size=4) if descriptor.client_streaming else one


@pytest.mark.timeout(600 + 3 * PER_METHOD)
@pytest.mark.parametrize("method", METHODS)
def test_structured_requests_get_documented_answers(fuzz_server, channel, method):
    failures_before = len(TALLY.failures)

    @settings(max_examples=PER_METHOD, **FUZZ_SETTINGS)
    @given(request=requests_for(method))
    def check(request) -> None:
        code, problem = call(fuzz_server, channel, method, request)
        TALLY.record(method, code, problem, _describe(request), "structured")

    check()
    assert fuzz_server.alive(), fuzz_server.run_log()[-3000:]
    assert fuzz_server.health() == "SERVING"
    found = TALLY.failures[failures_before:]
    assert not found, f"{len(found)} of {PER_METHOD} {method} requests failed; first: {found[:3]}"


@pytest.mark.timeout(600 + 3 * GARBAGE)
def test_garbage_bytes_on_every_method_are_refused_cleanly(fuzz_server, channel):
    failures_before = len(TALLY.failures)

    @settings(max_examples=GARBAGE, **FUZZ_SETTINGS)
    @given(method=st.sampled_from(METHODS),
           data=st.one_of(st.binary(max_size=64), st.binary(min_size=1, max_size=8).map(lambda b: b * 2000),
                          st.sampled_from([b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\xff\xff\xff\x0f",
                                           b"\x12\x80\x80\x80\x80\x10", b"\xff" * 16])))
    def check(method: str, data: bytes) -> None:
        request = [data] if SERVICE.methods_by_name[method].client_streaming else data
        code, problem = call(fuzz_server, channel, method, request, raw=True)
        TALLY.record(method, code, problem, _describe(data), "garbage")

    check()
    assert fuzz_server.alive(), fuzz_server.run_log()[-3000:]
    assert fuzz_server.health() == "SERVING"
    found = TALLY.failures[failures_before:]
    assert not found, f"{len(found)} of {GARBAGE} garbage requests failed; first: {found[:3]}"
