"""train.compile: the trained networks run through torch.compile, train like uncompiled ones, and keep their
parameter names (checkpoints and EMA unchanged)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fdistill.data import gaussian_mixture
from fdistill.training import Trainer, TrainConfig

from factories import tiny_denoising_method


def train(run_dir: Path, compile_networks: bool):
    method = tiny_denoising_method()
    config = TrainConfig(steps=3, batch_size=8, device="cpu", progress=False, log_every=1, export=False,
                         ema_decays=[0.9], run_dir=str(run_dir), compile=compile_networks)
    trainer = Trainer(method, gaussian_mixture(preset="ring8", num_samples=64), config)
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return method, trainer, losses


def test_compiled_run_trains_like_the_uncompiled_one(tmp_path):
    plain, plain_trainer, plain_losses = train(tmp_path / "plain", compile_networks=False)
    compiled, trainer, compiled_losses = train(tmp_path / "compiled", compile_networks=True)
    network = compiled.networks["denoiser"]
    assert network._compiled_call_impl is not None          # nn.Module.compile ran on the trained network
    assert len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)
    assert compiled.state_dict().keys() == plain.state_dict().keys()   # no "_orig_mod." prefixes
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    assert trainer.ema.snapshots[0.9].keys() == plain_trainer.ema.snapshots[0.9].keys()


def test_compile_option_reaches_torch_compile(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    method = tiny_denoising_method()
    Trainer(method, gaussian_mixture(preset="ring8", num_samples=64),
            TrainConfig(steps=1, batch_size=8, device="cpu", run_dir=str(tmp_path), compile=True))
    assert [fn.__self__ for fn in compiled] == [method.networks["denoiser"]]
