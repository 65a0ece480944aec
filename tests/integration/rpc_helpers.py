"""Small helpers shared by the gRPC integration tests."""

from __future__ import annotations

import grpc
import pytest


def ids_of(items) -> list[str]:
    return [i.item_id for i in items]


def call_error(function, request) -> grpc.RpcError:
    """The RpcError a unary call raises (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as caught:
        function(request, timeout=10)
    return caught.value
