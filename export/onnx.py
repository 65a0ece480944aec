"""Encoder -> ONNX (Optimum) -> graph-optimised -> dynamic INT8 (Optimum ORTQuantizer); the sequence model -> ONNX."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from onnxruntime.quantization.shape_inference import quant_pre_process
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

from llmrec.sequence_runner import OUTPUT, VALID_INPUT, VECTORS_INPUT
from llmrec.training.sequence_model import SequenceModel

log = logging.getLogger("llmrec.export")

ONNX_OPSET = 18


def export_fp32(encoder_dir: Path, work_dir: Path) -> Path:
    """Export the encoder (last_hidden_state output; pooling happens outside) and return the .onnx path."""
    out = work_dir / "fp32"
    main_export(
        str(encoder_dir),
        output=out,
        task="feature-extraction",
        library_name="transformers",
        opset=ONNX_OPSET,
        do_validation=True,  # Optimum compares ONNX and PyTorch outputs within atol
    )
    return out / "model.onnx"


def quantize_int8(fp32_model: Path, work_dir: Path) -> Path:
    """Dynamic INT8 with per-channel weights (per-tensor loses ~5% cosine on MiniLM; per-channel ~1%).

    ORT's pre-processing (shape inference + basic graph optimisation) runs first: Optimum's quantizer
    needs the inferred tensor types, and optimising before quantizing keeps fusable patterns intact.
    """
    prepared = work_dir / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    shutil.copy(fp32_model.parent / "config.json", prepared / "config.json")
    quant_pre_process(str(fp32_model), str(prepared / "model.onnx"), skip_symbolic_shape=True)
    quantizer = ORTQuantizer.from_pretrained(prepared, file_name="model.onnx")
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    quantized_dir = work_dir / "int8"
    quantizer.quantize(save_dir=quantized_dir, quantization_config=config)
    return quantized_dir / "model_quantized.onnx"


def export_sequence_model(model: SequenceModel, path: Path) -> Path:
    """The sequence model's last-position vector as ONNX (llmrec.sequence_runner's inputs and output), FP32: it is
    tiny, and the server runs it beside the encoder."""

    class LastVector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return self.model.last(vectors, valid)

    example = (torch.zeros(1, 2, model.project_in.in_features), torch.ones(1, 2, dtype=torch.bool))
    # eval(): the exporter traces in the wrapper's mode, and a fresh module is in training mode (dropout on).
    torch.onnx.export(
        LastVector().eval(), example, str(path), input_names=[VECTORS_INPUT, VALID_INPUT], output_names=[OUTPUT],
        dynamic_axes={VECTORS_INPUT: {0: "batch", 1: "length"}, VALID_INPUT: {0: "batch", 1: "length"},
                      OUTPUT: {0: "batch"}},
        opset_version=ONNX_OPSET, dynamo=False,
    )
    return path
