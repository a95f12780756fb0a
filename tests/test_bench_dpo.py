"""scripts/bench_dpo.py: each mode's recipe (pairs per step, LR per pair x pairs per step = the optimizer's LR, as
the released Diffusion-DPO code's --scale_lr) and one tiny end-to-end cell of its table."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_dpo  # noqa: E402

from fdistill.methods.diffusion_dpo import build  # noqa: E402
from fdistill.data.preference import shape_preferences  # noqa: E402
from fdistill.tiny_sd import tiny_sd_components  # noqa: E402


def test_full_fine_tuning_takes_16x_the_pairs_per_step_of_lora_at_the_same_lr_per_pair_scaling(tmp_path):
    args = bench_dpo.parse_args([])
    full, full_schedule = bench_dpo.dpo_settings("full", args, str(tmp_path))
    lora, lora_schedule = bench_dpo.dpo_settings("lora", args, str(tmp_path))
    assert full_schedule.batch_size == 16 * lora_schedule.batch_size == 256
    assert full.scale_lr and lora.scale_lr
    assert full.optimizer_lr() == pytest.approx(args.lr_full * 256)
    assert lora.optimizer_lr() == pytest.approx(3e-3)               # LoRA's tuned LR, written per pair
    # the scaled LR is the one the optimizer gets
    method = build(full, tiny_sd_components("sd15", 8, unet_channels=(32, 64)), shape_preferences(4, 8))
    assert method.phases()[0].lr == pytest.approx(args.lr_full * 256)


def test_quick_divides_the_dpo_steps_by_4():
    args, quick = bench_dpo.parse_args([]), bench_dpo.parse_args(["--quick", "--steps-full", "2"])
    assert quick.steps_lora == args.steps_lora // 4
    assert quick.steps_full == 1 and quick.pretrain_steps < args.pretrain_steps


def test_one_cell_trains_at_its_recipe_and_reports_the_table_fields(tmp_path):
    args = bench_dpo.parse_args(["--steps-full", "1", "--batch-full", "4", "--train-pairs", "8",
                                 "--cache", str(tmp_path / "cache"), "--grid", str(tmp_path / "grid.png")])
    args.vae_steps, args.pretrain_steps, args.samples_per_prompt = 1, 1, 1
    run = bench_dpo.dpo_cell(("size", "full"), args)
    assert run["batch_pairs"] == 4 and run["steps"] == 1
    assert run["optimizer_lr"] == pytest.approx(args.lr_full * 4)
    assert 0.0 <= run["implicit_accuracy"] <= 1.0 and run["unet_evals_per_pair"] == 4
    assert (tmp_path / "grid_size_full.png").exists()
