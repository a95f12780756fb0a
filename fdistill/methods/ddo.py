"""Method ``ddo``: Direct Discriminative Optimization (Zheng et al. 2025, arXiv 2503.01103) with self-play rounds.

The target starts as a copy of the frozen reference (the pre-trained model). Each step contrasts real data with
reference fakes (1:1) through the implicit discriminator beta * log(p_theta / p_ref) (``fdistill.losses.ddo``). Fakes come from a pool drawn with fdistill's samplers at the start of each round
(``fake_pool_size``) or online (``fake_pool_size=0``); for class-conditional models their labels are class-balanced.

Self-play rounds (``rounds=K``, ``steps_per_round=S``) are phases plus the method's step callbacks
(``Method.callbacks``, ``fdistill.methods.base.StepCallback``), which the one trainer runs between steps:
- round r covers global steps [r S, (r + 1) S) in its own Phase ``round_r``: a fresh optimizer per round, freed
  after the round's last step (``Phase.last_step``), so one round's moments live at a time (device and checkpoints);
- ``on_step_start``: the target is evaluated (``evaluator``, lower is better) at the round start and every
  ``eval_every`` steps; the best snapshot is kept (the round's start counts, so a round never makes things worse);
  the fake pool is drawn from the reference when the round is new;
- ``on_phase_end`` (round boundary): the final target is evaluated (the round's end score), then the best snapshot
  becomes the new reference AND the target's starting point;
- once replaced, the reference (and the best snapshot) are part of ``checkpoint_state_dict``, and the round counter
  and per-round history are buffers: a killed run resumes into the right round with the right reference.
The last round ends with ``finish()`` (``export``): final evaluation, the per-round table printed and written as JSON
(``summary_path``), the best snapshot loaded into the target (helpers: ``ddo_rounds``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..losses.ddo import ddo_log_ratio, ddo_loss
from ..samplers.config import SamplerConfig, as_sampler_config
from ..validation import require
from .base import Method, Phase, StepCallback, StepContext, check_optimizer_fields
from .ddo_rounds import (EVALUATORS, HISTORY_COLUMNS, Evaluate, class_balanced_labels,  # noqa: F401 (public here)
                         draw_samples, format_round_table, resolve_evaluator, round_rows, sample_with, write_json)
from .denoising import drop_labels


@dataclass
class DDOConfig:
    """Settings of the ``ddo`` method (``method.<field>=...``).

    Attributes:
        alpha: weight of the fake-sample term, in [0.5, 6] (paper default 1).
        beta: temperature of the implicit discriminator beta * log(p_theta / p_ref), in [0.01, 0.1] (default 0.02;
            it assumes the log ratio is a SUM over pixels).
        lr: learning rate (> 0; paper: ~1.5e-4 CIFAR-10, 5e-5 EDM2).
        weight_decay: AdamW decoupled weight decay (>= 0).
        betas: Adam betas, two values in [0, 1).
        optimizer: one of 'adamw', 'adam', 'adafactor'.
        max_grad_norm: gradient-norm clipping threshold (> 0), or null for none.
        num_draws: (sigma, noise) draws averaged per log-ratio estimate (>= 1).
        p_mean, p_std: EDM log-normal of the estimate's sigma (p_std > 0; paper: -0.4, 1.0).
        sigma_data: data standard deviation in the EDM weight (> 0; 0.5 for images in [-1, 1]).
        label_dropout: probability in [0, 1) that a row (real or fake) is evaluated unconditionally (null class), so a
            model trained with label dropout keeps its unconditional branch; 0 for unconditional data.
        fake_pool_size: fakes drawn from the reference at the start of each round (>= 0); 0 = draw each step's
            fakes online (exact 1:1 with fresh samples, but a full sampling run per step).
        generation_batch: batch size when generating the pool / evaluation samples (>= 1).
        rounds: self-play rounds (>= 1).
        steps_per_round: optimisation steps per round (>= 1); train.steps must equal rounds * steps_per_round.
        eval_every: steps between evaluations inside a round (>= 0; 0 = only at the round start and end).
        evaluator: 'auto' (default: 'sliced_wasserstein' for vector data, 'none' for images), 'none',
            'digits_fd' (built-in digits feature network), 'sliced_wasserstein' (sliced Wasserstein-1 of raw samples to
            the dataset, for point data), 'mode_tv' (nearest-mode histogram TV, Gaussian-mixture data) or
            'raw_frechet' (two-moment Frechet distance of raw samples: blind to modes); lower is better. 'none' = no
            best-checkpoint selection: the round's final target becomes the next reference.
        eval_samples: samples per evaluation (>= 2), drawn with the same seed every time.
        seed: seed of the fake pools (round r uses seed + r) and of the evaluation samples.
        summary_path: where ``finish`` writes the per-round table as JSON (null = do not write), e.g.
            ``${train.run_dir}/ddo_rounds.json``.
        sampler: the multi-step sampler that draws fakes, evaluation samples and ``generate`` (no guidance: DDO
            fine-tunes guidance-free sampling); null = SamplerConfig() defaults; the yaml points it at the
            top-level ``sampler`` group.
    """

    alpha: float = 1.0
    beta: float = 0.02
    lr: float = 1.5e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    optimizer: str = "adamw"
    max_grad_norm: float | None = None
    num_draws: int = 1
    p_mean: float = -0.4
    p_std: float = 1.0
    sigma_data: float = 0.5
    label_dropout: float = 0.0
    fake_pool_size: int = 2048
    generation_batch: int = 512
    rounds: int = 1
    steps_per_round: int = 1000
    eval_every: int = 0
    evaluator: str = "auto"
    eval_samples: int = 1000
    seed: int = 0
    summary_path: str | None = None
    sampler: SamplerConfig | None = None

    def __post_init__(self):
        check_optimizer_fields(self)
        require(0.5 <= self.alpha <= 6, f"method.alpha must be in [0.5, 6], got {self.alpha}")
        require(0.01 <= self.beta <= 0.1, f"method.beta must be in [0.01, 0.1], got {self.beta}")
        for name in ("num_draws", "generation_batch", "rounds", "steps_per_round"):
            require(getattr(self, name) >= 1, f"method.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("p_std", "sigma_data"):
            require(getattr(self, name) > 0, f"method.{name} must be > 0, got {getattr(self, name)}")
        for name in ("fake_pool_size", "eval_every"):
            require(getattr(self, name) >= 0, f"method.{name} must be >= 0, got {getattr(self, name)}")
        require(0 <= self.label_dropout < 1, f"method.label_dropout must be in [0, 1), got {self.label_dropout}")
        require(self.evaluator in EVALUATORS or self.evaluator == "auto",
                f"method.evaluator must be one of {sorted([*EVALUATORS, 'auto'])}, got {self.evaluator!r}")
        require(self.eval_samples >= 2, f"method.eval_samples must be >= 2, got {self.eval_samples}")
        self.sampler = as_sampler_config(self.sampler)

    def check_train(self, train) -> None:
        """The run must be exactly the rounds (``fdistill.config.compose`` calls this with the TrainConfig)."""
        expected = self.rounds * self.steps_per_round
        if train.steps != expected:
            raise ValueError(f"train.steps ({train.steps}) must equal method.rounds * method.steps_per_round = "
                             f"{self.rounds} * {self.steps_per_round} = {expected}")


Config = DDOConfig


class DDO(Method, StepCallback):
    """DDO fine-tuning of ``networks["model"]`` against ``frozen["reference"]`` (see the module docstring).

    Args:
        config: DDOConfig.
        reference: the pre-trained denoiser (an nn.Module with parameters); it is frozen here, the target is its copy.
        sample_shape: shape of one sample ([C, H, W] or [D]).
        num_classes: classes of the labels (0 = unconditional).
        evaluate: optional callable samples [N, *shape] -> score (lower is better); overrides ``config.evaluator``.
    """

    def __init__(self, config: DDOConfig, reference: nn.Module, sample_shape: tuple[int, ...], num_classes: int = 0,
                 evaluate: Evaluate | None = None):
        super().__init__()
        self.config = config
        self.sample_shape = tuple(sample_shape)
        self.num_classes = int(num_classes)
        if config.label_dropout > 0 and not self.num_classes:
            raise ValueError("method.label_dropout > 0 needs class-conditional data (data.num_classes > 0)")
        self.networks["model"] = copy.deepcopy(reference).requires_grad_(True)
        self.frozen["reference"] = reference.requires_grad_(False).eval()
        self.evaluate = evaluate
        if evaluate is not None:
            self.frozen["best"] = copy.deepcopy(reference)
        self.register_buffer("round_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_score", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("history", torch.full((config.rounds, len(HISTORY_COLUMNS)), math.nan, dtype=torch.float64))
        self._pool: tuple[Tensor, Tensor | None] | None = None
        self._pool_round = -1
        self._last_eval_step: int | None = None
        self._next_step = config.rounds * config.steps_per_round   # step count after the last trained step

    # ----------------------------------------------------------------------------------------------- phases
    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase(f"round_{r}", ("model",), lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas),
                      max_grad_norm=c.max_grad_norm, optimizer=c.optimizer,
                      last_step=(r + 1) * c.steps_per_round - 1)
                for r in range(c.rounds)]

    def round_at(self, step: int) -> int:
        """The self-play round of global step ``step`` (steps past the last round stay in it)."""
        return min(step // self.config.steps_per_round, self.config.rounds - 1)

    def phase_at(self, step: int) -> str:
        return f"round_{self.round_at(step)}"

    # ----------------------------------------------------------------------------------------------- rounds
    def _round_start(self, round_: int) -> int:
        return round_ * self.config.steps_per_round

    def _evaluate_target(self, step: int, all_reduce_mean: Callable[[Tensor], Tensor] | None = None) -> float | None:
        """Score the target, keep it as the best snapshot if it beats the round's best; None without evaluator.
        The score is averaged over processes, so every process takes the same snapshot decision."""
        if self.evaluate is None:
            return None
        c = self.config
        samples, _ = draw_samples(self.networks["model"], c.eval_samples, self.sample_shape, c.sampler,
                                  self.num_classes, c.seed, c.generation_batch)
        score = float(self.evaluate(samples))
        if all_reduce_mean is not None:
            score = float(all_reduce_mean(torch.tensor(score, dtype=torch.float64, device=self.best_score.device)))
        row = self.history[int(self.round_index)]
        if step == self._round_start(int(self.round_index)):
            row[0] = score
        if score < self.best_score:
            self.best_score.fill_(score)
            row[1], row[2] = score, step
            self.frozen["best"].load_state_dict(self.networks["model"].state_dict())
        return score

    def _advance_round(self) -> None:
        """Round boundary: the best snapshot (or the final target without evaluator) becomes the new reference and
        the target's starting point (the next ``on_step_start`` draws the new round's fake pool); the best score
        resets."""
        source = self.frozen["best"] if self.evaluate is not None else self.networks["model"]
        state = copy.deepcopy(source.state_dict())
        self.frozen["reference"].load_state_dict(state)
        self.networks["model"].load_state_dict(state)
        self.round_index += 1
        self.best_score.fill_(math.inf)

    def _end_round_evaluation(self, step: int, all_reduce_mean: Callable[[Tensor], Tensor] | None = None) -> None:
        score = self._evaluate_target(step, all_reduce_mean)
        if score is not None:
            self.history[int(self.round_index), 3] = score

    def _due_for_evaluation(self, step: int) -> bool:
        offset = step - self._round_start(int(self.round_index))
        return offset == 0 or (self.config.eval_every > 0 and offset % self.config.eval_every == 0)

    def callbacks(self) -> list[StepCallback]:
        """The rounds: this method's own ``on_phase_end`` / ``on_step_start``."""
        return [self]

    def on_phase_end(self, phase: Phase, ctx: StepContext) -> None:
        """Round boundary, before the next round's first step ``ctx.step``: score the final target (the round's end
        score), then the best snapshot becomes the new reference and starting point (``_advance_round``). A round
        closed already is left alone, so running a step's callbacks twice is harmless."""
        if phase.name != f"round_{int(self.round_index)}":
            return
        self._end_round_evaluation(ctx.step, ctx.all_reduce_mean)
        self._advance_round()

    def on_step_start(self, phase: str, ctx: StepContext) -> None:
        """Evaluate the target when due (round start, every ``eval_every`` steps; once per step); draw a new round's
        fake pool."""
        if self._due_for_evaluation(ctx.step) and self._last_eval_step != ctx.step:
            self._evaluate_target(ctx.step, ctx.all_reduce_mean)
            self._last_eval_step = ctx.step
        self._refresh_pool()
        self._next_step = ctx.step + 1

    def finish(self) -> dict[str, Any]:
        """End of training: evaluate the final target, load the best snapshot into it, print the per-round table and
        write it as JSON to ``summary_path``. Returns the summary."""
        if self.evaluate is not None and math.isnan(float(self.history[int(self.round_index), 3])):
            self._end_round_evaluation(self._next_step)
            self.networks["model"].load_state_dict(self.frozen["best"].state_dict())
        summary = self.round_summary()
        print(format_round_table(summary))
        if self.config.summary_path:
            write_json(summary, self.config.summary_path)
        return summary

    def round_summary(self) -> dict[str, Any]:
        """Per-round scores so far: {'evaluator', 'rounds': [{'round', 'start_score', 'best_score', ...}]}."""
        return {"evaluator": self.config.evaluator, "rounds": round_rows(self.history, int(self.round_index) + 1)}

    # ----------------------------------------------------------------------------------------------- fakes
    def _generate_fakes(self, num: int, seed: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``num`` samples of the reference [num, *shape] and their class-balanced labels [num] (None if uncond.)."""
        return draw_samples(self.frozen["reference"], num, self.sample_shape, self.config.sampler, self.num_classes,
                            seed, self.config.generation_batch)

    def _refresh_pool(self) -> None:
        """Draw the fake pool of the current round (seed + round) unless it is drawn already (or fakes are online)."""
        if self._pool_round != int(self.round_index) and self.config.fake_pool_size > 0:
            self._pool = self._generate_fakes(self.config.fake_pool_size, self.config.seed + int(self.round_index))
            self._pool_round = int(self.round_index)

    def _fake_batch(self, num: int, device: torch.device) -> dict[str, Tensor]:
        if self.config.fake_pool_size == 0:
            x, labels = self._generate_fakes(num)
        else:
            self._refresh_pool()     # drawn already by on_step_start in training; lazily for direct use
            pool_x, pool_labels = self._pool
            index = torch.randint(len(pool_x), (num,))
            x, labels = pool_x[index], None if pool_labels is None else pool_labels[index]
        batch = {"x_fake": x.to(device)}
        if labels is not None:
            batch["label_fake"] = labels.to(device)
        return batch

    def prepare_step(self, phase: str, micro_batches: list[dict[str, Any]], ctx: StepContext) -> list[Any]:
        """Pair every micro-batch with as many fakes as it has real samples (1:1); the rounds advance in the
        callbacks (``on_phase_end``, ``on_step_start``), which the trainer runs before this."""
        return [{**batch, **self._fake_batch(batch["x"].shape[0], batch["x"].device)} for batch in micro_batches]

    # ----------------------------------------------------------------------------------------------- loss
    def _condition(self, labels: Tensor | None, training: bool) -> Tensor | None:
        if not self.num_classes or labels is None:
            return None
        return drop_labels(labels, self.config.label_dropout if training else 0.0, self.num_classes)

    def loss(self, phase: str, item: dict[str, Any], ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        """DDO loss of one micro-batch: real and fake rows go through the model and the reference in one batch."""
        c = self.config
        num_real = item["x"].shape[0]
        x = torch.cat([item["x"], item["x_fake"].to(item["x"].dtype)])
        cond = None
        if self.num_classes:
            cond = self._condition(torch.cat([item["label"], item["label_fake"]]), ctx.training)
        log_ratio = ddo_log_ratio(self.networks["model"], self.frozen["reference"], x, cond, c.num_draws,
                                  c.p_mean, c.p_std, c.sigma_data)
        real, fake = log_ratio[:num_real], log_ratio[num_real:]
        loss = ddo_loss(real, fake, c.alpha, c.beta)
        accuracy = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
        return loss, {"loss": loss.item(), "log_ratio_real": real.mean().item(),
                      "log_ratio_fake": fake.mean().item(), "discriminator_accuracy": accuracy.item(),
                      "round": float(self.round_index)}

    # ----------------------------------------------------------------------------------------------- outputs
    def generate(self, num: int, generator: torch.Generator | None = None, cond: Any = None) -> Tensor:
        """``num`` samples of the target; labels cycle 0..num_classes-1 unless ``cond`` is given."""
        if cond is None and self.num_classes:
            cond = torch.arange(num) % self.num_classes
        return sample_with(self.networks["model"], num, self.sample_shape, self.config.sampler, cond, generator,
                           self.config.generation_batch)

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """Trained state plus, once the reference is no longer the pre-trained model, the reference itself (and the
        best snapshot of the running round), so a resumed run continues in the right round."""
        state = super().checkpoint_state_dict()
        kept = ("frozen.best.",) + (("frozen.reference.",) if int(self.round_index) > 0 else ())
        state.update({k: v for k, v in self.state_dict().items() if k.startswith(kept)})
        return state

    def export(self, directory: str | Path) -> None:
        """Finish the rounds (best snapshot into the target) and write it as a model directory."""
        from ..denoisers import save_denoiser

        self.finish()
        save_denoiser(self.networks["model"], directory)


def build(config: DDOConfig, model: nn.Module, data, evaluate: Evaluate | None = None) -> DDO:
    """The method from its config, the pre-trained denoiser of the ``model`` group (becomes the frozen reference;
    the target is a copy) and the DataSource of the ``data`` group. ``evaluate`` overrides ``config.evaluator``."""
    if isinstance(model, tuple):          # model=pretrained: fdistill.denoisers.load_denoiser returns (denoiser, info)
        model = model[0]
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ValueError("method=ddo needs a pre-trained network with parameters as the model group (the reference), "
                         f"e.g. model=pretrained model.path_or_hub_id=<dir or hub id>; got {type(model).__name__}")
    config = replace(config, evaluator=resolve_evaluator(config.evaluator, tuple(data.sample_shape)))
    factory = EVALUATORS[config.evaluator]
    if evaluate is None and factory is not None:
        evaluate = factory(data)
    # labelled data with an unconditional model (e.g. DDPM CIFAR-10): train unconditionally
    conditional = bool(data.num_classes) and bool(getattr(model, "num_classes", data.num_classes))
    return DDO(config, model, data.sample_shape, data.num_classes if conditional else 0, evaluate)
