"""``fdistill sample --ems``: DPM-Solver-v3 with a statistics file, and the errors for a missing or foreign one."""
import pytest
import torch

from fdistill.cli import main as cli_main
from fdistill.samplers import ModelStatistics

LAMBDAS = torch.linspace(-5.0, 7.0, 13, dtype=torch.float64)        # covers digits-exact's sigmas 80 .. 0.002


def statistics_file(path, element_shape, l_value=0.8):
    shape = (len(LAMBDAS), *element_shape)
    ModelStatistics(LAMBDAS, torch.full(shape, l_value), torch.full(shape, -0.1), torch.zeros(shape)).save(path)
    return str(path)


def sample(*args: str) -> int:
    return cli_main(["sample", "--no-progress", "--model", "digits-exact", "--num", "2", "--steps", "6", *args])


def test_ems_selects_dpm_solver_v3_and_changes_the_samples(tmp_path):
    ems = statistics_file(tmp_path / "ems.safetensors", (1, 8, 8))
    assert sample("--ems", ems, "--out", str(tmp_path / "implied")) == 0
    assert sample("--ems", ems, "--solver", "dpm_solver_v3", "--out", str(tmp_path / "explicit")) == 0
    assert sample("--solver", "unipc_bh2", "--out", str(tmp_path / "unipc")) == 0
    images = {name: (tmp_path / name / "000000.png").read_bytes() for name in ("implied", "explicit", "unipc")}
    assert images["implied"] == images["explicit"]
    assert images["implied"] != images["unipc"]


@pytest.mark.parametrize("case, message", [
    ("missing", "--solver dpm_solver_v3 needs --ems PATH"),
    ("foreign", "per element of shape (3, 8, 8) do not match the model's samples (1, 8, 8)"),
    ("absent", "does not exist"),
    ("other solver", "--ems is for --solver dpm_solver_v3, not --solver dpmpp_2m"),
])
def test_bad_ems_exits_2_naming_the_problem(case, message, tmp_path, capsys):
    options = {"missing": ["--solver", "dpm_solver_v3"],
               "foreign": ["--ems", statistics_file(tmp_path / "rgb.safetensors", (3, 8, 8))],
               "absent": ["--ems", str(tmp_path / "none.safetensors")],
               "other solver": ["--ems", statistics_file(tmp_path / "e.safetensors", ()), "--solver", "dpmpp_2m"]}
    assert sample(*options[case], "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
