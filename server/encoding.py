"""Run the ONNX encoder off the asyncio event loop.

Inference runs on a dedicated ThreadPoolExecutor: ONNX Runtime and tokenizers release the GIL, so the loop
keeps serving (health checks, other streams) while a batch runs. `encode_users` is the single entry point
for user texts; request micro-batching belongs there and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmrec.onnx_encoder import LENGTH_BUCKET, OnnxEncoder


class AsyncEncoder:
    """Async front of an OnnxEncoder with the bundle's token limits.

    Args:
        encoder: the loaded ONNX encoder.
        max_user_tokens: token window for user texts (manifest.max_user_tokens).
        max_item_tokens: token window for item texts (manifest.max_item_tokens).
        workers: inference threads; 1 when ONNX Runtime's intra-op threads already use every core.
    """

    def __init__(self, encoder: OnnxEncoder, max_user_tokens: int, max_item_tokens: int, workers: int = 1) -> None:
        self.encoder = encoder
        self.max_user_tokens = max_user_tokens
        self.max_item_tokens = max_item_tokens
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmrec-encoder")

    async def encode_users(self, texts: Sequence[str]) -> np.ndarray:
        """Rendered user texts -> (len(texts), dimension) float32 unit vectors."""
        return await self._run(self.encoder.encode, list(texts), self.max_user_tokens)

    async def encode_items(self, texts: Sequence[str]) -> np.ndarray:
        """Rendered item texts -> (len(texts), dimension) float32 unit vectors."""
        return await self._run(self.encoder.encode, list(texts), self.max_item_tokens)

    async def warm_up(self) -> list[int]:
        """Run one inference at every padded width a request can produce, so no request pays for a first run.

        Returns:
            The widths (token counts) that were run.
        """
        return await self._run(self._warm_up_sync)

    def warm_up_widths(self) -> list[int]:
        """Every width OnnxEncoder.tokenize can pad to: multiples of LENGTH_BUCKET, capped by the token limits."""
        widths = set(range(LENGTH_BUCKET, self.max_user_tokens + 1, LENGTH_BUCKET))
        widths |= {self.max_user_tokens, self.max_item_tokens}
        widths |= set(range(LENGTH_BUCKET, self.max_item_tokens + 1, LENGTH_BUCKET))
        return sorted(widths)

    def _warm_up_sync(self) -> list[int]:
        widths = self.warm_up_widths()
        # Token ids of some ordinary text, long enough to fill the widest window.
        ids = self.encoder.tokenizer.encode("a warm up sentence " * max(widths)).ids
        for width in widths:
            row = np.asarray(ids[:width], dtype=np.int64)[None, :]
            self.encoder.encode_tokens(row, np.ones_like(row))
        return widths

    async def _run(self, function, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def close(self) -> None:
        """Stop the inference threads once running work has finished."""
        self._executor.shutdown(wait=True, cancel_futures=True)
