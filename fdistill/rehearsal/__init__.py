"""Real-size rehearsal of the paper recipes: each recipe's real networks (published configs, random weights, no
download: ``fdistill.architectures``) trained for a few steps by the package's own code path, with the memory that
takes next to its analytic minimum.

One rehearsal composes ``experiment=<recipe>`` (``fdistill.config.compose``), replaces only what cannot run offline
or at full size — the ``model`` group by the same architecture built from config, the ``data`` group by built-in
data of the recipe's shape at a small resolution, the batch by 1-2 samples on one process, DDO's fake pool and
rounds by a small pool and one round — builds the run with ``fdistill.config.build_run`` (the method's own
``build``) and runs ``Trainer.train_step`` (the trainer's whole step: micro-batches, autocast, backward, clipping,
optimizer, EMA) on steps chosen so that every phase of the method runs.

Analytic minimum (bytes) = weights + optimizer states of the trained parameters + gradients of the largest phase +
EMA copies + frozen weights and buffers (everything else the method holds); activations come on top. Optimizer
states: AdamW / Adam two moments of the parameter's size; Adafactor (no first moment) one row and one column factor
per matrix, a full second moment for vectors. Peak memory: on CPU the peak resident set size of the training steps
(VmHWM, reset through /proc/self/clear_refs before the first step) minus the resident size of the interpreter with
torch and the libraries imported (``runtime_gib``: not the run's memory); on GPU ``torch.cuda.max_memory_allocated``
over the steps. Each rehearsal runs in its own process (``rehearse_in_subprocess``) so one recipe's peak does not
hide another's.

Modules: ``recipes`` (the rows and how a recipe is shrunk), ``memory`` (analytic minimum and measured peak),
``bare_dpo`` (the plain-PyTorch Diffusion-DPO step the trainer is timed against), ``run`` (one rehearsal, the
table, ``python -m fdistill.rehearsal``).
"""
from .memory import GIB, AnalyticMemory, PeakMemory, analytic_memory, optimizer_state_bytes, tensor_bytes
from .recipes import REHEARSALS, Rehearsal, compose_rehearsal, random_images
from .run import RehearsalResult, estimate_gib, format_table, main, rehearse, rehearse_in_subprocess

__all__ = ["GIB", "AnalyticMemory", "PeakMemory", "analytic_memory", "optimizer_state_bytes", "tensor_bytes",
           "REHEARSALS", "Rehearsal", "compose_rehearsal", "random_images", "RehearsalResult", "estimate_gib",
           "format_table", "main", "rehearse", "rehearse_in_subprocess"]
