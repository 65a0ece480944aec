"""The baseline `make bench` compares llmrec with: what one writes by following the usual tutorials.

A synchronous gRPC server (`grpc.server(ThreadPoolExecutor(max_workers=10))`) implementing
llmrec.v1.Recommender/Recommend with the same proto, the same text template and the same item rows:
a PyTorch FP32 encoder loaded with transformers `AutoModel` (the training checkpoint's encoder), mean pooling
under `torch.no_grad()`, one forward pass per request, and an exact numpy search (`vectors @ query`) over the
bundle's item rows. No micro-batching, no thread tuning, no INT8, no ANN index.

It lives in clients/ because it imports torch; the server never does.

    python -m bench.baseline --bundle bundles/ml-100k/<version> --encoder runs/ml-100k/checkpoint/encoder
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import torch
import typer
from transformers import AutoModel, AutoTokenizer

from llmrec import manifest as mf
from llmrec.item_record import read_items
from llmrec.template import ItemFields, RequestContext, UserText, render_user
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc


class BaselineServicer(pb_grpc.RecommenderServicer):
    """Recommend only; every other method is left UNIMPLEMENTED, as a tutorial server would."""

    def __init__(self, bundle: Path, encoder: Path) -> None:
        manifest = mf.read_manifest(bundle, verify_hashes=False)
        self.version = manifest.bundle_version
        self.max_tokens = manifest.max_user_tokens
        self.max_history_items = manifest.max_history_items
        self.tokenizer = AutoTokenizer.from_pretrained(str(encoder))
        self.model = AutoModel.from_pretrained(str(encoder))
        self.model.eval()
        catalogue = read_items(bundle / mf.ITEMS_FILE)
        self.item_ids: list[str] = [item_id for item_id, _ in catalogue]
        self.items: list[ItemFields] = [fields for _, fields in catalogue]
        self.row_of = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self.vectors = np.load(bundle / mf.VECTORS_FILE)  # rows [item vector, bias]: the same rows llmrec ranks

    def embed(self, text: str) -> np.ndarray:
        inputs = self.tokenizer(text, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()

    def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        history = []
        for entry in request.history:
            if entry.WhichOneof("item") == "text":
                history.append(ItemFields(entry.text.title, tuple(entry.text.categories), entry.text.brand,
                                          entry.text.description))
            elif entry.item_id in self.row_of:
                history.append(self.items[self.row_of[entry.item_id]])
            else:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown item id {entry.item_id!r}")
        ctx = request.context
        user_context = RequestContext(
            timestamp=ctx.timestamp.seconds + ctx.timestamp.nanos / 1e9 if ctx.HasField("timestamp") else None,
            utc_offset_minutes=ctx.utc_offset_minutes, device=ctx.device, locale=ctx.locale, query=ctx.query)
        text = render_user(UserText(history, user_context), self.max_history_items)
        query = np.append(self.embed(text), np.float32(1.0))
        scores = self.vectors @ query
        excluded = set(request.exclude_item_ids)
        if request.exclude_history:
            excluded |= {entry.item_id for entry in request.history if entry.item_id}
        for item_id in excluded:
            if item_id in self.row_of:
                scores[self.row_of[item_id]] = -np.inf
        k = max(1, min(request.k or 10, len(scores)))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return pb.RecommendResponse(
            items=[pb.RecommendedItem(item_id=self.item_ids[row], score=float(scores[row]),
                                      title=self.items[row].title, rank=rank)
                   for rank, row in enumerate(top, 1)],
            model_version=self.version, index_version=f"{self.version}:exact")


app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.command()
def main(
    bundle: Annotated[Path, typer.Option(help="Bundle whose items and item rows to rank.")],
    encoder: Annotated[Path, typer.Option(help="A transformers encoder directory (the training checkpoint's).")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 50061,
    workers: Annotated[int, typer.Option(help="gRPC thread pool size (the tutorials' 10).")] = 10,
) -> None:
    """Serve Recommend with PyTorch FP32 and exact numpy search."""
    logging.basicConfig(level=logging.INFO)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_RecommenderServicer_to_server(BaselineServicer(bundle, encoder), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"baseline serving on {host}:{bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    app()
