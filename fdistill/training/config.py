"""Plain dataclasses for the ``train:`` and ``sampler:`` sections of a run (no omegaconf here: library code);
``SamplerConfig`` lives with the samplers (``fdistill.samplers.config``) and is re-exported here.

``fdistill.config`` registers them as Hydra schemas, so a wrong key or value fails when the config is composed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..denoisers.io import HUB_ID
from ..samplers.config import SamplerConfig, as_sampler_config  # noqa: F401  (re-exported: the sampler: section)
from ..validation import require

MIXED_PRECISION = ("no", "fp16", "bf16")
# 'linear_warmup' is fdistill's own; the others are diffusers.optimization.get_scheduler's
LR_SCHEDULERS = ("linear_warmup", "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial")
RESUME_MODES = ("auto", "never", "force")


@dataclass
class TrainConfig:
    """The one training loop's settings (``train.<field>=...`` on the command line).

    Attributes:
        steps: total optimisation steps (> 0); a resumed run continues to this count.
        batch_size: GLOBAL batch per step, summed over processes and micro-batches (> 0); must be divisible by
            num_processes * micro_batches.
        micro_batches: gradient-accumulation micro-batches per process and step (>= 1).
        mixed_precision: 'no', 'fp16' or 'bf16' (torch.autocast around the method's loss; fp16 adds a loss scaler).
        seed: base seed; data order and every micro-batch's random draws derive from (seed, step, micro-batch), so
            runs are reproducible and resume exactly.
        ema_decays: EMA decays of ``method.ema_networks()`` (each in (0, 1)); [] = no EMA.
        ema_warmup_steps: EMA decay ramps as min(decay, (1 + k) / (10 + k)) for k < this many updates (0 = off).
        checkpoint_every: steps between checkpoints (> 0); a final checkpoint is always written.
        keep_last: number of checkpoints kept (>= 1); older ones are deleted.
        sample_every: steps between sample grids (``run_dir/samples/step_XXXXXX.png``); 0 = never.
        num_samples: images in a sample grid (> 0).
        eval_every: steps between evaluations (the ``eval`` group); 0 = never.
        log_every: steps between scalar logs (> 0).
        lr_warmup_steps: learning-rate warm-up, in updates of each phase (>= 0).
        lr_scheduler: LR schedule of each phase over its own updates: 'linear_warmup' (update k uses
            min(1, (k + 1) / lr_warmup_steps) of the LR, then constant) or one of diffusers' ``get_scheduler``:
            'constant', 'constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial' (their
            warm-up starts at 0; the decaying ones reach their end at train.steps).
        run_dir: output directory (config.yaml, metrics.jsonl, checkpoints/, samples/, model/).
        resume: 'auto': the newest intact checkpoint in run_dir, if any (damaged ones are named and set aside; when
            checkpoints exist but none is intact the run refuses to start); 'never': start at step 0 regardless;
            'force': as 'auto', but resume even when run-defining settings changed, applying the new values
            (``fdistill.training.resume`` lists which settings are run-defining); or a checkpoint directory.
        device: 'auto' (accelerate's choice: GPU when present), 'cpu' or 'cuda'.
        num_workers: data-loader worker processes (>= 0).
        export: write ``method.export(run_dir / 'model')`` at the end when the method supports it (with a model
            card, ``README.md``).
        push_to_hub: upload the export to the Hugging Face Hub repository ``hub_repo_id`` at the end (created if
            missing; the token is huggingface_hub's: ``HF_TOKEN`` or ``hf auth login``). Needs ``export``.
        hub_repo_id: the Hub model repository ``owner/name`` of ``push_to_hub``.
        progress: show a tqdm progress bar on the main process.
        fsdp: shard the trained networks with FSDP2 across processes (``fdistill.training.sharding``); also on when
            ``accelerate launch`` runs with an FSDP config (``distributed_type: FSDP``). No effect on one process.
            Needs mixed_precision 'no' or 'bf16' and Adam/AdamW.
        fsdp_min_params: under FSDP, every submodule with at least this many parameters is its own FSDP unit
            (gathered one at a time; >= 1); smaller ones belong to their parent, the network itself is always one.
        compile: compile the trained networks with ``torch.compile`` (``nn.Module.compile``: in place, parameter
            names and checkpoints unchanged); the first steps of each phase pay the compilation.
    """

    steps: int = 1000
    batch_size: int = 64
    micro_batches: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    ema_decays: list[float] = field(default_factory=list)
    ema_warmup_steps: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 2
    sample_every: int = 0
    num_samples: int = 64
    eval_every: int = 0
    log_every: int = 50
    lr_warmup_steps: int = 0
    lr_scheduler: str = "linear_warmup"
    run_dir: str = "runs/train"
    resume: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    export: bool = True
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    progress: bool = True
    fsdp: bool = False
    fsdp_min_params: int = 10_000_000
    compile: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batches", "checkpoint_every", "keep_last", "log_every", "num_samples",
                     "fsdp_min_params"):
            require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "eval_every", "lr_warmup_steps", "num_workers", "ema_warmup_steps"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        require(self.batch_size % self.micro_batches == 0,
                 f"train.batch_size ({self.batch_size}) must be divisible by train.micro_batches ({self.micro_batches})")
        require(self.mixed_precision in MIXED_PRECISION,
                 f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        require(self.lr_scheduler in LR_SCHEDULERS,
                f"train.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        require(self.lr_scheduler != "constant" or self.lr_warmup_steps == 0,
                f"train.lr_warmup_steps={self.lr_warmup_steps} has no effect with train.lr_scheduler='constant'; "
                "use 'constant_with_warmup' or 'linear_warmup'")
        require(self.device in ("auto", "cpu", "cuda"), f"train.device must be one of ('auto', 'cpu', 'cuda'), got {self.device!r}")
        require(all(0.0 < d < 1.0 for d in self.ema_decays), f"train.ema_decays must each be in (0, 1), got {list(self.ema_decays)}")
        require(bool(self.run_dir), "train.run_dir must be a non-empty path")
        require(not self.push_to_hub or (self.export and bool(self.hub_repo_id) and HUB_ID.match(self.hub_repo_id)),
                f"train.push_to_hub needs train.export=true and train.hub_repo_id=<owner>/<name>, got "
                f"export={self.export}, hub_repo_id={self.hub_repo_id!r}")
        require(self.resume in RESUME_MODES or os.path.isdir(self.resume),
                f"train.resume must be one of {RESUME_MODES} or an existing checkpoint directory, got {self.resume!r}")
