"""The default solver for a step count (fdistill.samplers.recommend) and its use by ``fdistill sample``."""
import pytest
import torch

from fdistill.cli import main as cli_main
from fdistill.commands.sample import build_parser
from fdistill.denoisers import save_denoiser
from fdistill.networks import tiny_unet
from fdistill.samplers import RECOMMENDED_SOLVERS, SOLVERS, nfe, recommended_solver


def test_recommended_solver_is_a_one_evaluation_per_step_registry_solver_of_the_nearest_budget_below():
    assert all(name in SOLVERS and nfe(name, 10) == 10 for name in RECOMMENDED_SOLVERS.values())
    assert recommended_solver(10) == RECOMMENDED_SOLVERS[10]
    assert recommended_solver(12) == RECOMMENDED_SOLVERS[10]          # between budgets: the one below
    assert recommended_solver(1000) == RECOMMENDED_SOLVERS[max(RECOMMENDED_SOLVERS)]
    assert recommended_solver(2) == RECOMMENDED_SOLVERS[min(RECOMMENDED_SOLVERS)]
    with pytest.raises(ValueError, match="num_steps"):
        recommended_solver(0)


def test_fdistill_sample_defaults_to_the_recommended_solver(tmp_path):
    torch.manual_seed(1)
    save_denoiser(tiny_unet(num_classes=3), tmp_path / "tiny")
    assert build_parser().parse_args(["--model", "m", "--out", "o"]).solver is None

    def pngs(*solver):
        out = tmp_path / "_".join(solver or ("default",))
        assert cli_main(["sample", "--no-progress", "--model", str(tmp_path / "tiny"), "--num", "2", "--steps", "10",
                         *(["--solver", *solver] if solver else []), "--out", str(out)]) == 0
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}

    default = pngs()
    assert default == pngs(recommended_solver(10))
    other = next(name for name in ("dpmpp_2m", "unipc_bh2") if name != recommended_solver(10))
    assert pngs(other) != default          # the default is not some fixed solver regardless of the steps
