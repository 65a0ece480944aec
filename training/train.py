"""Fine-tune the packaged MiniLM as a text recommender, then evaluate it beside popularity and zero-shot."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import typer
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

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
from llmrec.training.evaluation import ScoreFn, evaluate, popularity_scores
from llmrec.training.losses import FullSoftmaxLoss
from llmrec.training.model import CatalogueEncoder, TextRecommender, pretrained_encoder_path
from llmrec.scoring import Adjustments, ScoreTerms, ScoringRule, item_rows, query_rows
from llmrec.training.calibration import (
    CALIBRATION_METRIC, calibration_search, choose_adjustments, cooccurrence_before, histories,
)
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


def model_scores(
    model: TextRecommender, data: Interactions, config: TrainConfig, temperature: float,
    use_context: bool | None = None, rule: ScoringRule = ScoringRule(),
    cooccurrence: CooccurrenceTable | None = None, items: torch.Tensor | None = None,
    sequence_model: SequenceModel | None = None,
) -> ScoreFn:
    """Scores as served: the scoring rule (llmrec.scoring) over the model's user and item vectors.
    items: the catalogue_vectors, if already encoded."""
    items = catalogue_vectors(model, data, config) if items is None else items
    item_array = items.cpu().numpy()
    rows = item_rows(item_array, model.item_bias.detach().cpu().numpy(), temperature)

    def score(examples: list[Example]) -> np.ndarray:
        users = user_vectors(model, data, list(examples), config, use_context)
        sequences = histories_sequence_vectors(sequence_model, data, examples, item_array) \
            if rule.adjustments.sequence_weight else None
        return rule.dense_scores(users, rows, histories(data, examples), cooccurrence, sequences)

    return score


def user_vectors(model: TextRecommender, data: Interactions, examples: list[Example], config: TrainConfig,
                 use_context: bool | None = None) -> np.ndarray:
    """(len(examples), dim) unit user vectors of the examples' rendered histories."""
    with torch.no_grad():
        return model.encode_all(user_texts(data, examples, config, use_context), config.max_user_tokens).cpu().numpy()


def histories_sequence_vectors(sequence_model: SequenceModel | None, data: Interactions, examples: list[Example],
                               item_vectors: np.ndarray) -> np.ndarray:
    """(len(examples), dim) sequence model vectors of each example's history."""
    if sequence_model is None:
        raise ValueError("a sequence model weight needs the sequence model")
    return sequence_vectors(sequence_model, [data.sequences[e.user][: e.target_position] for e in examples], item_vectors)


def sequence_model_scores(sequence_model: SequenceModel, data: Interactions, item_vectors: np.ndarray,
                          item_bias: np.ndarray, temperature: float) -> ScoreFn:
    """The sequence model as a recommender of its own, as it was trained: <vector, item> + temperature * bias."""
    return lambda examples: (histories_sequence_vectors(sequence_model, data, list(examples), item_vectors)
                             @ item_vectors.T + temperature * item_bias)


def catalogue_vectors(model: TextRecommender, data: Interactions, config: TrainConfig) -> torch.Tensor:
    """(num_items, dim) unit item vectors (text + id part), as the bundle serves them."""
    with torch.no_grad():
        return model.item_vectors(model.encode_all([render_item(i) for i in data.items], config.max_item_tokens))


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


def train(data: Interactions, config: TrainConfig, out: Path, encoder_path: Path | None = None,
          sequence_config: SequenceModelConfig = SequenceModelConfig(), model_free_baselines: bool = True) -> dict:
    """Train, checkpoint to out/checkpoint, evaluate, and write out/metrics.json. Returns the metrics.
    model_free_baselines: also evaluate popularity and the zero-shot encoder (see evaluate_against_baselines).

    Under torchrun every rank trains on its own batches (batch_size each) with gradients averaged by DDP;
    rank 0 alone saves, evaluates and returns the metrics (other ranks return {}).
    """
    distributed = _Distributed()
    seed_everything(config.seed)
    encoder_path = encoder_path or pretrained_encoder_path()
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
    catalogue = CatalogueEncoder(model, [render_item(i) for i in data.items], config.max_item_tokens)
    bf16 = config.bf16 and bf16_is_fast(distributed.device)
    log.info("training steps in %s", "bfloat16 autocast" if bf16 else "float32")
    curve: list[dict] = []
    model.train()
    progress = tqdm(range(config.max_steps), desc="train", unit="step", disable=not distributed.is_main)
    for step in progress:
        batch = [examples[i] for i in rng.integers(0, len(examples), config.batch_size)]
        targets = torch.tensor([data.sequences[e.user][e.target_position] for e in batch], device=distributed.device)
        if step % config.refresh_items_every == 0:
            with torch.autocast(distributed.device.type, dtype=torch.bfloat16, enabled=bf16):
                cached_items = catalogue.encode().float()  # no grad: the catalogue is a fixed target matrix
        texts = training_user_texts(data, batch, config, rng)
        loss = training_step(trainer, model, optimizer, loss_fn, texts, cached_items, targets, config, bf16)
        schedule.step()
        elapsed = time.monotonic() - started
        curve.append({"step": step + 1, "loss": loss.item(), "seconds": round(elapsed, 2)})
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if distributed.any(bool(config.time_budget_minutes) and elapsed > config.time_budget_minutes * 60):
            log.warning("time budget of %.1f min spent after %d steps", config.time_budget_minutes, step + 1)
            break
    train_seconds = time.monotonic() - started
    model.eval()
    if not distributed.is_main:
        distributed.close()
        return {}
    training = {"world_size": distributed.world_size, "device": device_description(distributed.device), "bf16": bf16,
                "train_seconds": round(train_seconds, 1), "steps": len(curve), "curve": curve}
    metrics = finish_run(model, data, config, out, encoder_path, training, sequence_config, model_free_baselines)
    distributed.close()
    return metrics


def finish_run(model: TextRecommender, data: Interactions, config: TrainConfig, out: Path, encoder_path: Path,
               training: dict, sequence_config: SequenceModelConfig = SequenceModelConfig(),
               model_free_baselines: bool = True) -> dict:
    """After training: train the sequence model over the trained item vectors, choose the adjustments on
    validation users, save the checkpoint, evaluate against the baselines and write out/metrics.json
    (`training`: how the text model was trained). Returns the metrics."""
    valid = split_examples(data, "valid")
    if config.calibration_users:
        valid = valid[: config.calibration_users]
    cooccurrence = {split: cooccurrence_before(data, split) for split in ("valid", "test")}
    items = catalogue_vectors(model, data, config)
    item_array = items.cpu().numpy()
    item_bias = model.item_bias.detach().cpu().numpy()
    sequence_model, sequence_training = train_sequence_model(
        data, item_array, item_bias, config.temperature, dataclasses.replace(sequence_config, seed=config.seed))
    rows = item_rows(item_array, item_bias, config.temperature)
    valid_users = user_vectors(model, data, valid, config)
    valid_sequences = histories_sequence_vectors(sequence_model, data, valid, item_array)
    adjustments, calibration = choose_adjustments(
        lambda chunk: ScoreTerms.of(ScoringRule(), query_rows(valid_users[chunk]) @ rows.T, item_array,
                                    histories(data, valid[chunk]), cooccurrence["valid"], valid_sequences[chunk]),
        data, valid, with_sequence=True)
    log.info("adjustments %s chosen on %d validation users: %s %.4f (%.4f with none)", adjustments, len(valid),
             CALIBRATION_METRIC, calibration[adjustments.key][CALIBRATION_METRIC],
             calibration[Adjustments().key][CALIBRATION_METRIC])
    device = model.item_bias.device
    # the bundle serves test histories, so it counts every event before the test targets
    checkpoint = CheckpointLayout.of_run(out)
    model.cpu().save(checkpoint.root, data.item_ids, adjustments, cooccurrence["test"])
    model.to(device)
    config.save(checkpoint.config)
    save_sequence_model(sequence_model, checkpoint.sequence_model)

    evaluation = evaluate_against_baselines(model, data, config, encoder_path, adjustments,
                                            cooccurrence[config.eval_split], sequence_model, items,
                                            model_free_baselines)
    metrics = {
        "dataset": data.name,
        "config": dataclasses.asdict(config),
        **training,
        "sequence_model": {"config": dataclasses.asdict(sequence_model.config), **sequence_training},
        "adjustments": dataclasses.asdict(adjustments),
        "calibration_metric": CALIBRATION_METRIC,
        "calibration_search": calibration_search(),
        "adjustments_validation": calibration,
        "evaluation": evaluation,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate_against_baselines(
    model: TextRecommender, data: Interactions, config: TrainConfig, encoder_path: Path, adjustments: Adjustments,
    cooccurrence: CooccurrenceTable, sequence_model: SequenceModel, item_tensor: torch.Tensor,
    model_free_baselines: bool = True,
) -> dict[str, dict]:
    """Metrics on config.eval_split (test unless tuning) for popularity, the zero-shot encoder, the sequence model
    alone and the trained model with its adjustments, in one run. item_tensor: the model's catalogue_vectors.
    Popularity and the zero-shot encoder do not depend on the trained model or its seed: without
    model_free_baselines they are left out (`make eval` evaluates them with seed 0 only)."""
    examples = split_examples(data, config.eval_split)
    if config.eval_users:
        examples = examples[: config.eval_users]
    items = item_tensor.cpu().numpy()
    results = {}
    if model_free_baselines:
        zero_shot = TextRecommender(encoder_path, data.num_items).to(model.item_bias.device).eval()
        results["popularity"] = evaluate(popularity_scores(data), data, examples, config.ks)
        results["zero_shot"] = evaluate(model_scores(zero_shot, data, config, config.temperature), data, examples,
                                        config.ks)
    results |= {
        "sequence_model_alone": evaluate(sequence_model_scores(
            sequence_model, data, items, model.item_bias.detach().cpu().numpy(), config.temperature),
            data, examples, config.ks),
        "llmrec": evaluate(model_scores(model, data, config, config.temperature, rule=ScoringRule(adjustments),
                                        cooccurrence=cooccurrence, items=item_tensor,
                                        sequence_model=sequence_model), data, examples, config.ks),
    }
    if data.timestamps and config.use_context:  # the same model, its context (time of day, weekday) withheld
        scores = model_scores(model, data, config, config.temperature, False, ScoringRule(adjustments), cooccurrence,
                              item_tensor, sequence_model)
        results["llmrec_without_context"] = evaluate(scores, data, examples, config.ks)
    return results


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
    )
    interactions = load_interactions(data)
    out.mkdir(parents=True, exist_ok=True)
    metrics = train(interactions, config, out)
    if not metrics:  # a torchrun rank other than 0
        return
    typer.echo(f"\n{interactions.name}: {metrics['steps']} steps in {metrics['train_seconds']} s; {config.eval_split} split, full ranking:")
    typer.echo(format_table(metrics["evaluation"], config.ks))
    typer.echo(f"checkpoint: {out / 'checkpoint'}")


if __name__ == "__main__":
    typer.run(main)
