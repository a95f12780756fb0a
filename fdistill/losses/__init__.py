"""Losses: pure functions of tensors, the exact formulas of the papers (equation numbers in the docstrings).
Per-sample values in, hyper-parameters as plain floats."""
from .dpo import diffusion_dpo_loss, dpo_logits, implicit_reward_accuracy, per_sample_mse, sft_loss  # noqa: E402,F401
from .ddo import ddo_log_ratio, ddo_log_ratio_from_outputs, ddo_loss, likelihood_mode  # noqa: E402,F401
from .fdistill import (DIVERGENCES, F_DIVERGENCE_WEIGHTS, density_ratio, discriminator_loss, dmd_gradient,  # noqa: E402,F401
                       f_divergence_weight, fdistill_generator_loss, generator_gan_loss)
