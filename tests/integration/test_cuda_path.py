"""The GPU path: FP32 through an IOBinding, batching across requests. Skipped where no GPU answers; the
IOBinding code itself is also exercised on CPU so it cannot rot on machines without one."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llmrec import manifest as mf
from llmrec.onnx_encoder import OnnxEncoder, choose_providers
from llmrec.server.bundle import LoadedBundle
from llmrec.server.encoding import AsyncEncoder, BatchPolicy

TEXTS = ["Star Wars (1977) (Action, Sci-Fi)", "recently: Notting Hill (1999) (Comedy, Romance); Sleepless in Seattle",
         "looking for: space adventure. time: friday evening. recently: Alien (1979) (Horror, Sci-Fi)"]

needs_gpu = pytest.mark.skipif(choose_providers(prefer_gpu=True)[0] != "CUDAExecutionProvider",
                               reason="no CUDA GPU (or this onnxruntime build lacks CUDAExecutionProvider)")


def test_io_binding_path_matches_plain_runs_on_cpu(tiny_bundle):
    plain = OnnxEncoder(tiny_bundle / mf.MODEL_FP32_FILE, tiny_bundle / mf.TOKENIZER_FILE)
    bound = OnnxEncoder(tiny_bundle / mf.MODEL_FP32_FILE, tiny_bundle / mf.TOKENIZER_FILE, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    assert np.array_equal(bound.encode(TEXTS, 128), plain.encode(TEXTS, 128))


@needs_gpu
def test_cuda_serves_fp32_through_io_binding_and_matches_cpu(tiny_bundle):
    bundle = LoadedBundle.load(tiny_bundle, prefer_gpu=True)
    assert bundle.precision == "fp32" and bundle.encoder.provider == "CUDAExecutionProvider"
    assert bundle.encoder.io_binding
    cpu = OnnxEncoder(tiny_bundle / mf.MODEL_FP32_FILE, tiny_bundle / mf.TOKENIZER_FILE)
    gpu_vectors = bundle.encoder.encode(TEXTS, 128)
    cosine = np.sum(gpu_vectors * cpu.encode(TEXTS, 128), axis=1)
    assert cosine.min() > 0.999


@needs_gpu
def test_cuda_batches_across_requests_and_results_match_single_runs(tiny_bundle):
    bundle = LoadedBundle.load(tiny_bundle, prefer_gpu=True)
    manifest = bundle.manifest
    encoder = AsyncEncoder(bundle.encoder, manifest.max_user_tokens, manifest.max_item_tokens,
                           policy=BatchPolicy(max_delay_s=0.01))
    try:
        assert encoder.across_requests  # the CUDA default
        asyncio.run(encoder.warm_up())

        async def together():
            return await asyncio.gather(*(encoder.encode_users([text]) for text in TEXTS))

        batched = np.concatenate(asyncio.run(together()))
    finally:
        encoder.close()
    alone = np.concatenate([bundle.encoder.encode([text], manifest.max_user_tokens) for text in TEXTS])
    # FP32 has no per-batch quantisation: batch-mates change a vector by rounding only.
    assert np.sum(batched * alone, axis=1).min() > 0.9999
