"""Fine-tune the packaged MiniLM as a text recommender, then evaluate it beside popularity and zero-shot."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import typer
from torch.nn.parallel import DistributedDataParallel

from llmrec.cold_start import ColdStartFit, fit_cold_start_map
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.template import render_item, render_user
from llmrec.training.augment import with_history_dropout, with_synthetic_query
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.cli_options import FROZEN_LAYERS, HISTORY_DROPOUT, configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import (
    Example,
    Interactions,
    item_popularity,
    load_interactions,
    split_examples,
    train_sequences,
    user_text,
)
from llmrec.training.evaluation import ScoreFn, cold_items, evaluate, popularity_scores
from llmrec.training.losses import FullSoftmaxLoss
from llmrec.training.model import CatalogueEncoder, TextRecommender, pretrained_encoder_path
from llmrec.scoring import Adjustments, ScoreTerms, ScoringRule, item_rows
from llmrec.training.calibration import (
    CALIBRATION_METRIC, CHUNK_USERS, COOCCURRENCE_WEIGHT_GRID, HISTORY_SCORE_GRID, HISTORY_VECTOR_WEIGHT_GRID,
    POLICIES, SEQUENCE_WEIGHT_GRID, calibration_search, choose_adjustments, cooccurrence_before, evaluate_policies,
    choose_fast_path, histories, validation_terms,
)
from llmrec.training.progress import BoundedProgress, phase, progress
from llmrec.training.sequence_model import (
    SequenceModel, SequenceModelConfig, save_sequence_model, sequence_vectors, train_sequence_model,
)

log = logging.getLogger("llmrec.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds training up on this device: ~2x on AVX-512 CPUs, yet ~20x slower on
    AVX2-only CPUs, where oneDNN has no bfloat16 kernels (fwd+bwd of a 32x128-token batch: 1.5 s FP32, 34 s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def device_description(device: torch.device) -> str:
    """Where training ran, for reports: the GPU's name, or the CPU's vector extension and threads (which set
    bf16 or float32 and most of the step time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def training_examples(data: Interactions) -> list[Example]:
    """Every position of every training sequence after the first is a target (all positions supervised)."""
    return [Example(u, t) for u, seq in enumerate(train_sequences(data)) for t in range(1, len(seq))]


def user_texts(data: Interactions, examples: list[Example], config: TrainConfig, use_context: bool | None = None) -> list[str]:
    use_context = config.use_context if use_context is None else use_context
    return [render_user(user_text(data, e, use_context), config.max_history_items) for e in examples]


def training_user_texts(data: Interactions, examples: list[Example], config: TrainConfig, rng: np.random.Generator) -> list[str]:
    """User texts for a training batch: older history items dropped at random, some given a synthetic query
    derived from their target."""
    texts = []
    for e in examples:
        user = with_history_dropout(user_text(data, e, config.use_context), rng, config.history_dropout)
        target = data.items[data.sequences[e.user][e.target_position]]
        user = with_synthetic_query(user, target, rng, config.query_probability, config.query_only_probability)
        texts.append(render_user(user, config.max_history_items))
    return texts


# Texts per encode_all call when a whole set is encoded (catalogue, validation users): progress between calls.
# The texts are sorted by length first, so the calls see the length-sorted batches one call would.
ENCODE_CHUNK = 1024


@torch.no_grad()
def encode_texts(model: TextRecommender, texts: list[str], max_tokens: int, desc: str) -> torch.Tensor:
    """model.encode_all(texts) with a progress bar (desc) when there are more than ENCODE_CHUNK texts."""
    if len(texts) <= ENCODE_CHUNK:
        return model.encode_all(texts, max_tokens)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = torch.empty(len(texts), model.dimension, device=model.item_bias.device)
    bar = progress(total=len(texts), desc=desc, unit="text", logger=log)
    for start in range(0, len(texts), ENCODE_CHUNK):
        rows = order[start : start + ENCODE_CHUNK]
        out[torch.as_tensor(rows, device=out.device)] = model.encode_all([texts[i] for i in rows], max_tokens)
        bar.update(len(rows))
    bar.close()
    return out


def user_vectors(model: TextRecommender, data: Interactions, examples: list[Example], config: TrainConfig,
                 use_context: bool | None = None, desc: str = "encode users") -> np.ndarray:
    """(len(examples), dim) unit user vectors of the examples' rendered histories."""
    texts = user_texts(data, examples, config, use_context)
    return encode_texts(model, texts, config.max_user_tokens, desc).cpu().numpy()


def histories_sequence_vectors(sequence_model: SequenceModel | None, data: Interactions, examples: list[Example],
                               item_vectors: np.ndarray, desc: str = "sequence vectors") -> np.ndarray:
    """(len(examples), dim) sequence model vectors of each example's history (progress past ENCODE_CHUNK)."""
    if sequence_model is None:
        raise ValueError("a sequence model weight needs the sequence model")
    chunk = 4 * ENCODE_CHUNK
    bar = progress(total=len(examples), desc=desc, unit="user", logger=log, disable=len(examples) <= chunk)
    parts = []
    for start in range(0, max(1, len(examples)), chunk):
        part = examples[start : start + chunk]
        parts.append(sequence_vectors(sequence_model, [data.sequences[e.user][: e.target_position] for e in part],
                                      item_vectors))
        bar.update(len(part))
    bar.close()
    return np.concatenate(parts)


def sequence_model_scores(sequence_model: SequenceModel, data: Interactions, item_vectors: np.ndarray,
                          item_bias: np.ndarray, temperature: float) -> ScoreFn:
    """The sequence model as a recommender of its own, as it was trained: <vector, item> + temperature * bias."""
    return lambda examples: (histories_sequence_vectors(sequence_model, data, list(examples), item_vectors)
                             @ item_vectors.T + temperature * item_bias)


def catalogue_text_vectors(model: TextRecommender, data: Interactions, config: TrainConfig) -> torch.Tensor:
    """(num_items, dim) unit text vectors of the catalogue (the item tower without the id part)."""
    texts = [render_item(i) for i in data.items]
    return encode_texts(model, texts, config.max_item_tokens, "encode catalogue")


def catalogue_vectors(model: TextRecommender, data: Interactions, config: TrainConfig) -> torch.Tensor:
    """(num_items, dim) unit item vectors (text + id part), as the bundle serves them."""
    with torch.no_grad():
        return model.item_vectors(catalogue_text_vectors(model, data, config))


def fit_cold_start(model: TextRecommender, data: Interactions, text_vectors: torch.Tensor,
                   seed: int) -> ColdStartFit | None:
    """Fit the cold-start map (llmrec.cold_start) on the items that were training targets and give every other
    catalogue item its predicted id vector and bias in place of the ones training left it (a zero id vector
    pushed around only as a negative, and a low bias). Sets model.cold_start; None when too few items trained.
    Idempotent: trained items' parameters, and so the map, do not change."""
    untrained = cold_items(data)
    text = text_vectors.cpu().numpy()
    ids = model.id_embedding.weight.detach().cpu().numpy()
    bias = model.item_bias.detach().cpu().numpy()
    try:
        fit = fit_cold_start_map(text[~untrained], ids[~untrained], bias[~untrained], seed=seed)
    except ValueError as error:
        log.warning("no cold-start map: %s", error)
        model.cold_start = None
        return None
    predicted_ids, predicted_bias = fit.map.predict(text[untrained])
    with torch.no_grad():
        rows = torch.as_tensor(np.flatnonzero(untrained), device=model.item_bias.device)
        model.id_embedding.weight[rows] = torch.as_tensor(predicted_ids, device=rows.device)
        model.item_bias[rows] = torch.as_tensor(predicted_bias, device=rows.device)
    model.cold_start = fit.map
    log.info("cold-start map fitted on %d trained items (held-out R^2: id vectors %.3f, bias %.3f) and applied "
             "to %d items that were never a training target", fit.items, fit.id_r2, fit.bias_r2, int(untrained.sum()))
    return fit


class _Distributed:
    """torchrun/DDP when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU); a no-op single process otherwise."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.world_size > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must leave the loop at the same step."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self) -> None:
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def build_optimizer(model: TextRecommender, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one learning rate each for the trainable encoder layers, the item-ID table and the item bias;
    the encoder's group comes first, as training_step clips it."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.encoder.parameters() if p.requires_grad],
             "lr": config.encoder_lr, "weight_decay": config.weight_decay},
            {"params": [model.id_embedding.weight], "lr": config.id_lr, "weight_decay": 0.0},
            {"params": [model.item_bias], "lr": config.bias_lr, "weight_decay": 0.0},
        ]
    )


def training_step(trainer: torch.nn.Module, model: TextRecommender, optimizer: torch.optim.Optimizer,
                  loss_fn: FullSoftmaxLoss, user_texts: list[str], cached_items: torch.Tensor,
                  targets: torch.Tensor, config: TrainConfig, bf16: bool) -> torch.Tensor:
    """One optimizer step on a batch of user texts against the cached catalogue; returns the loss.
    trainer is the model itself or its DDP wrapper."""
    with torch.autocast(cached_items.device.type, dtype=torch.bfloat16, enabled=bf16):
        tokens = model.tokenize(user_texts, config.max_user_tokens)
        users, items, bias = trainer(tokens["input_ids"], tokens["attention_mask"], cached_items)
    loss = loss_fn(users.float(), items, bias, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
    optimizer.step()
    return loss


def data_fingerprint(data: Interactions) -> dict:
    """What a trained text model depends on in the data set: its size and a digest of the item texts, the
    sequences and their timestamps (cheap: ~1 s for 50,000 users)."""
    digest = hashlib.sha256()
    for item_id, item in zip(data.item_ids, data.items):
        digest.update(f"{item_id}\t{render_item(item)}\n".encode())
    for user, sequence in enumerate(data.sequences):
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes() + b"|")
        if data.timestamps:
            digest.update(np.asarray(data.timestamps[user], dtype=np.float64).tobytes())
    return {"name": data.name, "items": data.num_items, "users": len(data.sequences),
            "events": sum(map(len, data.sequences)), "sha256": digest.hexdigest()}


def training_record(data: Interactions, config: TrainConfig, encoder_path: Path, training: dict) -> dict:
    """checkpoint/training.json: what decides the trained text model (TrainConfig.training_fields, the starting
    encoder, the data set) and how training went (`training`)."""
    return {"config": config.training_fields(), "encoder": str(encoder_path), "data": data_fingerprint(data),
            "training": training}


def save_text_model(model: TextRecommender, data: Interactions, config: TrainConfig, out: Path, encoder_path: Path,
                    training: dict) -> None:
    """Checkpoint the trained text model before anything else runs: no adjustments yet (the item head reads as
    not calibrated until finish_run saves them), no sequence model, and checkpoint/training.json last, so that
    a run killed later (sequence model, calibration, evaluation) resumes from here instead of training again."""
    checkpoint = CheckpointLayout.of_run(out)
    checkpoint.root.mkdir(parents=True, exist_ok=True)
    checkpoint.training.unlink(missing_ok=True)  # the record is written last: its presence means a whole model
    checkpoint.sequence_model.unlink(missing_ok=True)  # an older run's, trained on other item vectors
    device = model.item_bias.device
    model.cpu().save(checkpoint.root, data.item_ids, adjustments=None)
    model.to(device)
    config.save(checkpoint.config)
    partial = checkpoint.training.with_suffix(".json.tmp")
    partial.write_text(json.dumps(training_record(data, config, encoder_path, training), indent=2))
    partial.replace(checkpoint.training)
    log.info("text model saved to %s (adjustments not chosen yet)", checkpoint.root)


def trained_text_model(out: Path, data: Interactions, config: TrainConfig, encoder_path: Path) -> dict | None:
    """`training` of the text model in out/checkpoint if it was trained with these training settings (the
    finishing ones, TrainConfig.FINISHING_FIELDS, may differ: as `make eval` reuses runs), this encoder and
    this data set; None otherwise."""
    checkpoint = CheckpointLayout.of_run(out)
    if not (checkpoint.training.is_file() and checkpoint.item_head.is_file() and checkpoint.encoder.is_dir()):
        return None
    saved = json.loads(checkpoint.training.read_text())
    wanted = training_record(data, config, encoder_path, {})
    if any(saved.get(key) != wanted[key] for key in ("config", "encoder", "data")):
        log.info("%s holds a text model trained with other settings or data: training again", checkpoint.root)
        return None
    return saved["training"]


def train(data: Interactions, config: TrainConfig, out: Path, encoder_path: Path | None = None,
          sequence_config: SequenceModelConfig = SequenceModelConfig(), model_free_baselines: bool = True,
          resume: bool = True) -> dict:
    """Train, checkpoint to out/checkpoint, finish (finish_run: sequence model, adjustments, evaluation) and
    write out/metrics.json. Returns the metrics.
    model_free_baselines: also evaluate popularity and the zero-shot encoder (see evaluate_against_baselines).
    resume: if out/checkpoint holds a text model trained with these training settings on this data (saved
    as soon as training ends, see save_text_model), skip training and only finish it.

    Under torchrun every rank trains on its own batches (batch_size each) with gradients averaged by DDP;
    rank 0 alone saves, evaluates and returns the metrics (other ranks return {}).
    """
    distributed = _Distributed()
    seed_everything(config.seed)
    encoder_path = encoder_path or pretrained_encoder_path()
    resumed = trained_text_model(out, data, config, encoder_path) if resume else None
    if resumed is not None:
        if not distributed.is_main:
            distributed.close()
            return {}
        log.info("resuming: %s holds a text model trained with these settings (%s steps); finishing it "
                 "(sequence model, adjustments, evaluation). --retrain trains again.",
                 CheckpointLayout.of_run(out).root, resumed.get("steps"))
        model = TextRecommender.from_checkpoint(CheckpointLayout.of_run(out).root).to(distributed.device).eval()
        metrics = finish_run(model, data, config, out, encoder_path, resumed, sequence_config, model_free_baselines)
        distributed.close()
        return metrics
    with phase("train the text model", log):
        model, training = train_text_model(data, config, encoder_path, distributed)
    if not distributed.is_main:
        distributed.close()
        return {}
    with phase("save the text model", log):
        save_text_model(model, data, config, out, encoder_path, training)
    metrics = finish_run(model, data, config, out, encoder_path, training, sequence_config, model_free_baselines)
    distributed.close()
    return metrics


def train_text_model(data: Interactions, config: TrainConfig, encoder_path: Path,
                     distributed: _Distributed) -> tuple[TextRecommender, dict]:
    """The training loop: the trained model (eval mode) and how training went (steps, seconds, loss curve)."""
    model = TextRecommender(encoder_path, data.num_items, id_dropout=config.id_dropout).to(distributed.device)
    model.freeze_bottom(config.frozen_layers)
    model.init_bias(item_popularity(data))
    trainer = distributed.wrap(model)
    loss_fn = FullSoftmaxLoss(config.temperature)
    optimizer = build_optimizer(model, config)
    started = time.monotonic()

    def progress_fraction(step: int) -> float:
        """How far through training we are: by steps, or by the time budget if that runs out first."""
        by_time = (time.monotonic() - started) / (config.time_budget_minutes * 60) if config.time_budget_minutes else 0
        return max(step / max(1, config.max_steps), by_time)

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)) * max(0.0, 1.0 - progress_fraction(step)),
    )
    examples = training_examples(data)
    rng = np.random.default_rng([config.seed, distributed.rank])  # each rank draws its own batches
    texts = [render_item(i) for i in data.items]
    encoding_started = time.monotonic()
    catalogue = CatalogueEncoder(model, texts, config.max_item_tokens)
    log.info("catalogue of %d items prepared for training in %.1f s (frozen layers %s)", len(texts),
             time.monotonic() - encoding_started, "cached" if catalogue.caches_frozen_layers else "not cached")
    bf16 = config.bf16 and bf16_is_fast(distributed.device)
    log.info("training steps in %s", "bfloat16 autocast" if bf16 else "float32")
    curve: list[dict] = []
    model.train()
    bar = BoundedProgress("train", config.max_steps, config.time_budget_minutes, disable=not distributed.is_main,
                          logger=log, started=started)
    for step in range(config.max_steps):
        batch = [examples[i] for i in rng.integers(0, len(examples), config.batch_size)]
        targets = torch.tensor([data.sequences[e.user][e.target_position] for e in batch], device=distributed.device)
        if step % config.refresh_items_every == 0:
            encoding_started = time.monotonic()
            with torch.autocast(distributed.device.type, dtype=torch.bfloat16, enabled=bf16):
                cached_items = catalogue.encode().float()  # no grad: the catalogue is a fixed target matrix
            if distributed.is_main and time.monotonic() - encoding_started > 5:
                log.info("catalogue of %d items re-encoded at step %d in %.1f s (every %d steps)", len(texts), step,
                         time.monotonic() - encoding_started, config.refresh_items_every)
        texts_batch = training_user_texts(data, batch, config, rng)
        loss = training_step(trainer, model, optimizer, loss_fn, texts_batch, cached_items, targets, config, bf16)
        schedule.step()
        elapsed = time.monotonic() - started
        curve.append({"step": step + 1, "loss": loss.item(), "seconds": round(elapsed, 2)})
        bar.update(step + 1, f"loss {loss.item():.3f}")
        if distributed.any(bool(config.time_budget_minutes) and elapsed > config.time_budget_minutes * 60):
            log.warning("time budget of %.1f min spent after %d steps", config.time_budget_minutes, step + 1)
            break
    bar.close()
    train_seconds = time.monotonic() - started
    model.eval()
    return model, {"world_size": distributed.world_size, "device": device_description(distributed.device),
                   "bf16": bf16, "train_seconds": round(train_seconds, 1), "steps": len(curve), "curve": curve}


def finish_run(model: TextRecommender, data: Interactions, config: TrainConfig, out: Path, encoder_path: Path,
               training: dict, sequence_config: SequenceModelConfig = SequenceModelConfig(),
               model_free_baselines: bool = True) -> dict:
    """After training: fit the cold-start map (fit_cold_start), train the sequence model over the item vectors, choose the adjustments on
    validation users, save the checkpoint, evaluate against the baselines and write out/metrics.json
    (`training`: how the text model was trained). Returns the metrics.

    Memory does not grow with the number of users beyond (users x dim) vectors: the adjustments are chosen
    CHUNK_USERS users at a time (each chunk's ScoreTerms is a few (CHUNK_USERS x items) float64 matrices) and
    evaluation scores 256 users at a time. The sequence model is saved into the checkpoint as soon as it is
    trained; a run killed later resumes from the checkpoint (train's `resume`)."""
    valid = split_examples(data, "valid")
    if config.calibration_users:
        valid = valid[: config.calibration_users]
    checkpoint = CheckpointLayout.of_run(out)
    cooccurrence = {split: cooccurrence_before(data, split) for split in ("valid", "test")}
    with phase("encode the catalogue", log):
        text_vectors = catalogue_text_vectors(model, data, config)
    with phase("fit the cold-start map", log):
        cold_start = fit_cold_start(model, data, text_vectors, config.seed)
        with torch.no_grad():
            items = model.item_vectors(text_vectors)
    item_array = items.cpu().numpy()
    item_bias = model.item_bias.detach().cpu().numpy()
    with phase("train the sequence model", log):
        sequence_model, sequence_training = train_sequence_model(
            data, item_array, item_bias, config.temperature, dataclasses.replace(sequence_config, seed=config.seed))
        checkpoint.root.mkdir(parents=True, exist_ok=True)
        save_sequence_model(sequence_model, checkpoint.sequence_model)
    rows = item_rows(item_array, item_bias, config.temperature)
    with phase(f"encode {len(valid)} validation users", log):
        valid_users = user_vectors(model, data, valid, config, desc="encode validation users")
        valid_sequences = histories_sequence_vectors(sequence_model, data, valid, item_array,
                                                     desc="validation sequence vectors")
    with phase("choose the adjustments", log), calibration_progress(len(valid), with_sequence=True) as counted:
        adjustments, calibration = choose_adjustments(
            counted(validation_terms(rows, item_array, data, valid, cooccurrence["valid"], valid_users,
                                     valid_sequences)),
            data, valid, with_sequence=True)
    log.info("adjustments %s chosen on %d validation users: %s %.4f (%.4f with none)", adjustments, len(valid),
             CALIBRATION_METRIC, calibration[adjustments.key][CALIBRATION_METRIC],
             calibration[Adjustments().key][CALIBRATION_METRIC])
    # The fast path (no encoder run) predicts the user vector from the history's item vectors (llmrec.fast_user)
    # and gets its own adjustments by the same search.
    with phase("fit the fast path's user map and choose its adjustments", log):
        fast_adjustments, fast_fit, fast_calibration = choose_fast_path(
            rows, item_array, data, valid, cooccurrence["valid"], valid_sequences, valid_users, config.seed)
    log.info("fast path adjustments %s: %s %.4f on validation (full path %.4f)", fast_adjustments, CALIBRATION_METRIC,
             fast_calibration[CALIBRATION_METRIC], calibration[adjustments.key][CALIBRATION_METRIC])
    device = model.item_bias.device
    with phase("save the adjustments", log):
        # the bundle serves test histories, so it counts every event before the test targets
        model.cpu().save(checkpoint.root, data.item_ids, adjustments, cooccurrence["test"], fast_adjustments,
                         fast_fit.map)
        model.to(device)
        config.save(checkpoint.config)

    with phase("evaluate", log):
        evaluation = evaluate_against_baselines(model, data, config, encoder_path, adjustments,
                                                cooccurrence[config.eval_split], sequence_model, items,
                                                model_free_baselines, valid_users)
    metrics = {
        "dataset": data.name,
        "config": dataclasses.asdict(config),
        **training,
        "sequence_model": {"config": dataclasses.asdict(sequence_model.config), **sequence_training},
        "adjustments": dataclasses.asdict(adjustments),
        "calibration_metric": CALIBRATION_METRIC,
        "calibration_search": calibration_search(),
        "adjustments_validation": calibration,
        "cold_start": None if cold_start is None else {
            "items": cold_start.items, "id_alpha": cold_start.id_alpha, "bias_alpha": cold_start.bias_alpha,
            "id_r2": cold_start.id_r2, "bias_r2": cold_start.bias_r2},
        "fast_path": {"adjustments": dataclasses.asdict(fast_adjustments),
                      **{key: fast_calibration[key]
                         for key in ("user_map", "model_weight", "chosen", CALIBRATION_METRIC)}},
        **evaluation,  # evaluate_against_baselines: the rows, each history policy, per-user test ranks
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def calibration_stage_choices(with_sequence: bool) -> list[int]:
    """How many choices each stage of choose_adjustments tries (its docstring names the stages), at most: a
    stage skips the choices an earlier one scored."""
    first = len(HISTORY_SCORE_GRID) * len(COOCCURRENCE_WEIGHT_GRID) * len(HISTORY_VECTOR_WEIGHT_GRID)
    if not with_sequence:
        return [first]
    return [first, len(HISTORY_VECTOR_WEIGHT_GRID) * len(SEQUENCE_WEIGHT_GRID),
            len(HISTORY_SCORE_GRID) * len(COOCCURRENCE_WEIGHT_GRID)]


@contextlib.contextmanager
def calibration_progress(users: int, with_sequence: bool, chunk_users: int = CHUNK_USERS):
    """A progress bar over choose_adjustments' (stage, chunk) steps: yields a wrapper for its terms_of that
    counts the chunks as they are scored."""
    stages = calibration_stage_choices(with_sequence)
    chunks = max(1, math.ceil(users / chunk_users))
    bar = progress(total=len(stages) * chunks, desc="choose adjustments", unit="chunk", logger=log)
    calls = 0

    def counted(terms_of):
        def wrapped(chunk: slice) -> ScoreTerms:
            nonlocal calls
            if calls:
                bar.update(1)  # the previous chunk's choices are ranked by now
            stage = min(calls // chunks, len(stages) - 1)
            bar.set_postfix_str(f"stage {stage + 1}/{len(stages)}, <={stages[stage]} choices, "
                                f"{chunk_users} users/chunk", refresh=False)
            calls += 1
            return terms_of(chunk)
        return wrapped

    try:
        yield counted
    finally:
        bar.total = max(calls, 1)
        bar.update(calls - bar.n)
        bar.close()


# Bump when the rows evaluate_against_baselines returns change: `make eval` finishes a run made under another again.
EVALUATION_PROTOCOL = 2


def evaluate_against_baselines(
    model: TextRecommender, data: Interactions, config: TrainConfig, encoder_path: Path, adjustments: Adjustments,
    cooccurrence: CooccurrenceTable, sequence_model: SequenceModel, item_tensor: torch.Tensor,
    model_free_baselines: bool = True, valid_user_vectors: np.ndarray | None = None,
) -> dict:
    """Every row on config.eval_split (test unless tuning) under both history policies (calibration.POLICIES), in
    one run: popularity, the zero-shot encoder, the text model alone (no adjustments), the sequence model alone,
    and ours with the adjustments chosen on validation (published: the same adjustments, history item score 0).
    Each baseline's deployed history item score is chosen on the validation users ours were calibrated on.
    item_tensor: the model's catalogue_vectors; cooccurrence: the table of events before the evaluated targets;
    valid_user_vectors: the model's vectors of those validation users, if already encoded (finish_run's).
    Popularity and the zero-shot encoder do not depend on the trained model or its seed: without
    model_free_baselines they are left out (`make eval` evaluates them with seed 0 only).

    Returns metrics.json's evaluation keys: "policies" ({policy: {row: metrics}}), "history_scores" (each
    baseline's calibration), "test_ranks" ({policy: {"llmrec": each user's target rank}}), "evaluation" (the rows
    as `make train` has always shown them: baselines published, ours deployed) and "evaluation_protocol".
    """
    examples = split_examples(data, config.eval_split)[: config.eval_users or None]
    valid = split_examples(data, "valid")[: config.calibration_users or None]
    ours = encoded_user_scores(model, data, config, examples, item_tensor, sequence_model)
    policies, history_scores = {policy: {} for policy in POLICIES}, {}
    for name, (valid_scores, test_scores) in baseline_scores(model, data, config, encoder_path, sequence_model,
                                                             item_tensor, valid, examples, ours,
                                                             model_free_baselines, valid_user_vectors).items():
        rows, _, calibration = evaluate_policies(valid_scores, test_scores, data, valid, examples, config.ks)
        history_scores[name] = calibration.as_json()
        for policy in POLICIES:
            policies[policy][name] = rows[policy]
    variants = {"llmrec": ours}
    if data.timestamps and config.use_context:  # the same model, its context (time of day, weekday) withheld
        variants["llmrec_without_context"] = encoded_user_scores(model, data, config, examples, item_tensor,
                                                                 sequence_model, use_context=False)
    ranks = {}
    for policy, chosen in zip(POLICIES, (dataclasses.replace(adjustments, history_item_score=0.0), adjustments)):
        for name, scores_under in variants.items():
            policies[policy][name], ranks[(policy, name)] = evaluate(
                scores_under(ScoringRule(chosen), cooccurrence), data, examples, config.ks,
                desc=f"evaluate {name} ({policy})", return_ranks=True)
    legacy = {name: row for name, row in policies["published"].items() if name in LEGACY_BASELINES}
    legacy |= {name: policies["deployed"][name] for name in variants}
    return {"evaluation": legacy, "policies": policies, "history_scores": history_scores,
            "test_ranks": {policy: {"llmrec": ranks[(policy, "llmrec")].tolist()} for policy in POLICIES},
            "evaluation_protocol": EVALUATION_PROTOCOL}


# the baselines `make train` has always shown (with no history item score), in metrics.json's "evaluation"
LEGACY_BASELINES = ("popularity", "zero_shot", "sequence_model_alone")


def baseline_scores(model: TextRecommender, data: Interactions, config: TrainConfig, encoder_path: Path,
                    sequence_model: SequenceModel, item_tensor: torch.Tensor, valid: list[Example],
                    examples: list[Example], ours: Callable[[ScoringRule, CooccurrenceTable | None], ScoreFn],
                    model_free_baselines: bool, valid_user_vectors: np.ndarray | None,
                    ) -> dict[str, tuple[ScoreFn, ScoreFn]]:
    """Each baseline row's own scores (no adjustments) of the validation users and of the evaluated users.
    ours: encoded_user_scores of the evaluated users; the text model alone reuses their vectors, and
    valid_user_vectors if given."""
    rows = {}
    if model_free_baselines:
        rows["popularity"] = (popularity_scores(data),) * 2
        zero_shot = TextRecommender(encoder_path, data.num_items).to(model.item_bias.device).eval()
        zero_shot_items = catalogue_vectors(zero_shot, data, config)
        rows["zero_shot"] = tuple(encoded_user_scores(zero_shot, data, config, users, zero_shot_items)(ScoringRule())
                                  for users in (valid, examples))
    rows["text_model"] = (encoded_user_scores(model, data, config, valid, item_tensor, users=valid_user_vectors)(
        ScoringRule()), ours(ScoringRule()))
    sequence = sequence_model_scores(sequence_model, data, item_tensor.cpu().numpy(),
                                     model.item_bias.detach().cpu().numpy(), config.temperature)
    rows["sequence_model_alone"] = (sequence, sequence)
    return rows


def encoded_user_scores(model: TextRecommender, data: Interactions, config: TrainConfig, examples: list[Example],
                        items: torch.Tensor, sequence_model: SequenceModel | None = None,
                        use_context: bool | None = None, users: np.ndarray | None = None,
                        ) -> Callable[[ScoringRule, CooccurrenceTable | None], ScoreFn]:
    """The users of `examples` encoded once (each row scores them again): returns (rule, co-occurrence table) ->
    their scores under that rule (llmrec.scoring), for any batch of these examples. items: catalogue_vectors;
    users: the examples' user vectors, if already encoded."""
    users = user_vectors(model, data, examples, config, use_context) if users is None else users
    item_array = items.cpu().numpy()
    rows = item_rows(item_array, model.item_bias.detach().cpu().numpy(), config.temperature)
    sequences = None if sequence_model is None else histories_sequence_vectors(sequence_model, data, examples,
                                                                               item_array)
    position = {example: n for n, example in enumerate(examples)}

    def under(rule: ScoringRule, table: CooccurrenceTable | None = None) -> ScoreFn:
        def score(batch: list[Example]) -> np.ndarray:
            at = [position[e] for e in batch]
            return rule.dense_scores(users[at], rows, histories(data, batch), table,
                                     None if sequences is None else sequences[at])
        return score

    return under


def format_table(evaluation: dict[str, dict], ks: tuple[int, ...]) -> str:
    columns = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in evaluation.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def main(
    data: Path = typer.Option(..., help="data set directory (RecBole atomic/benchmark, or items.jsonl + interactions.csv)"),
    out: Path = typer.Option(..., help="run directory: checkpoint/ and metrics.json are written here"),
    max_steps: int = typer.Option(TrainConfig.max_steps, help="optimiser steps"),
    time_budget_minutes: float = typer.Option(TrainConfig.time_budget_minutes, help="stop training when spent (0 = none)"),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    seed: int = typer.Option(TrainConfig.seed),
    use_context: bool = typer.Option(TrainConfig.use_context, help="render time/device/query context into user text"),
    eval_users: int = typer.Option(TrainConfig.eval_users, help="evaluate on the first N users (0 = all)"),
    eval_split: str = typer.Option(TrainConfig.eval_split, help="'valid' to choose hyperparameters, 'test' to report"),
    max_user_tokens: int = typer.Option(TrainConfig.max_user_tokens, help="token window of the user text"),
    history_dropout: float = HISTORY_DROPOUT,
    frozen_layers: int = FROZEN_LAYERS,
    calibration_users: int = typer.Option(TrainConfig.calibration_users,
                                          help="choose the adjustments on the first N validation users (0 = all)"),
    sequence_epochs: int = typer.Option(SequenceModelConfig.max_epochs, min=1,
                                        help="sequence model epochs at most (it may stop earlier on validation)"),
    sequence_minutes: float = typer.Option(SequenceModelConfig.time_budget_minutes,
                                           help="stop the sequence model when spent"),
    retrain: bool = typer.Option(False, "--retrain",
                                 help="train again even if out/checkpoint holds a text model trained with these "
                                      "settings on this data (by default such a run is resumed: only the sequence "
                                      "model, the adjustments and the evaluation run again)"),
) -> None:
    configure_logging()
    config = TrainConfig(
        max_steps=max_steps,
        time_budget_minutes=time_budget_minutes,
        batch_size=batch_size,
        seed=seed,
        use_context=use_context,
        eval_users=eval_users,
        eval_split=eval_split,
        max_user_tokens=max_user_tokens,
        history_dropout=history_dropout,
        frozen_layers=frozen_layers,
        calibration_users=calibration_users,
    )
    sequence_config = SequenceModelConfig(max_epochs=sequence_epochs, time_budget_minutes=sequence_minutes)
    interactions = load_interactions(data)
    out.mkdir(parents=True, exist_ok=True)
    metrics = train(interactions, config, out, sequence_config=sequence_config, resume=not retrain)
    if not metrics:  # a torchrun rank other than 0
        return
    available = len(split_examples(interactions, config.eval_split))
    users = (f"the first {config.eval_users} of {available} users only" if 0 < config.eval_users < available
             else f"all {available} users")
    typer.echo(f"\n{interactions.name}: {metrics['steps']} steps in {metrics['train_seconds']} s; "
               f"sequence model {metrics['sequence_model']['epochs']} epochs in {metrics['sequence_model']['seconds']} s; "
               f"{config.eval_split} split, {users}, full ranking:")
    typer.echo(format_table(metrics["evaluation"], config.ks))
    typer.echo(f"checkpoint: {out / 'checkpoint'}")


if __name__ == "__main__":
    typer.run(main)
