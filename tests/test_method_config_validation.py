"""Method configs share one check of their optimizer fields (``check_optimizer_fields``): same field, same message."""
from __future__ import annotations

import pytest

from fdistill.methods.ddo import DDOConfig
from fdistill.methods.denoising import DenoisingConfig
from fdistill.methods.diffusion_dpo import DiffusionDPOConfig

BAD_FIELDS = [
    ({"lr": 0.0}, "method.lr must be > 0, got 0.0"),
    ({"weight_decay": -0.1}, "method.weight_decay must be >= 0, got -0.1"),
    ({"betas": [0.9, 1.0]}, r"method.betas must be two values in \[0, 1\), got \[0.9, 1.0\]"),
    ({"optimizer": "sgd"}, r"method.optimizer must be one of \('adamw', 'adam', 'adafactor'\), got 'sgd'"),
    ({"max_grad_norm": 0.0}, "method.max_grad_norm must be > 0 or null, got 0.0"),
]


@pytest.mark.parametrize("config_class", [DenoisingConfig, DDOConfig, DiffusionDPOConfig])
@pytest.mark.parametrize("fields, message", BAD_FIELDS)
def test_bad_optimizer_field_is_named_with_its_allowed_values(config_class, fields, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        config_class(**fields)
    config_class()                                                    # the defaults pass
