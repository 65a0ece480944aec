"""The ranking stage's cross-encoder -> ONNX (Optimum, text-classification) -> dynamic INT8, like the encoder."""

from __future__ import annotations

import logging
from pathlib import Path

from optimum.exporters.onnx import main_export

from llmrec.export.onnx import ONNX_OPSET, quantize_int8

log = logging.getLogger("llmrec.export")


def export_ranker_int8(model_dir: Path, work_dir: Path) -> Path:
    """A saved cross-encoder (training/ranking_stage.py's CrossEncoder.save) -> its INT8 .onnx (inputs
    llmrec.ranking_stage.PAIR_INPUTS, output OUTPUT)."""
    fp32 = work_dir / "fp32"
    main_export(str(model_dir), output=fp32, task="text-classification", library_name="transformers",
                opset=ONNX_OPSET, do_validation=True)
    return quantize_int8(fp32 / "model.onnx", work_dir)
