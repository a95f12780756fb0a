"""The sampling commands take their sampler and CLIP defaults from the one place that holds them."""
from __future__ import annotations

import pytest

from fdistill.commands import clipscore, fid, sample
from fdistill.samplers import SamplerConfig


REQUIRED = {sample: ["--model", "m", "--out", "o"], fid: ["--gen", "g", "--ref", "r"], clipscore: ["--images", "i"]}


@pytest.mark.parametrize("command", [sample, fid, clipscore])
def test_schedule_and_guidance_defaults_follow_sampler_config(command, monkeypatch):
    monkeypatch.setattr(SamplerConfig, "schedule", "logsnr")
    monkeypatch.setattr(SamplerConfig, "guidance", 3.5)
    defaults = vars(command.build_parser().parse_args(REQUIRED[command]))
    assert (defaults["schedule"], defaults["guidance"]) == ("logsnr", 3.5)


def test_fid_solver_and_clip_defaults_follow_their_sources(monkeypatch):
    from fdistill.commands import sample_options

    monkeypatch.setattr(SamplerConfig, "solver", "dpmpp_2m_sde")
    monkeypatch.setattr(sample_options, "CLIP_MODEL", "ViT-L-14")
    defaults = vars(fid.build_parser().parse_args(REQUIRED[fid]))
    assert (defaults["solver"], defaults["clip_model"]) == ("dpmpp_2m_sde", "ViT-L-14")
