"""The one training loop (accelerate), EMA, atomic checkpoints and logging: ``trainer.py`` (the loop), ``run_state.py``
(checkpoints, resume), ``outputs.py`` (samples, evaluation, export, reports), ``optimization.py``, ``batches.py``."""
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import SamplerConfig, TrainConfig
from .ema import EMA
from .logging import JsonlLogger, Trackers
from .plots import write_curves
from .resume import ResumeConflict
from .run_lock import RunDirLocked
from .trainer import REFUSALS, NonFiniteLossError, Trainer, save_sample_grid, split_batch, stream_seed

__all__ = [
    "CheckpointError", "ResumeConflict", "RunDirLocked", "REFUSALS", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "save_checkpoint", "SamplerConfig", "TrainConfig", "EMA", "JsonlLogger", "Trackers",
    "NonFiniteLossError", "Trainer", "save_sample_grid", "split_batch", "stream_seed", "write_curves",
]
