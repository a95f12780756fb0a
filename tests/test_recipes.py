"""docs/recipes.md against the composed paper experiments: every row that names a config key states the value the
experiment composes to, every paper experiment has its table, and the behaviour the page promises holds."""
import ast
import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from fdistill.config import build_run, compose

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
PAPER_EXPERIMENTS = ("cifar10_fdistill", "imagenet64_fdistill", "sd15_fdistill", "sdxl_fdistill", "cifar10_ddo",
                     "imagenet64_ddo", "dpo_sd15", "dpo_sdxl", "sd3_fdistill", "flux_fdistill", "sd3_dpo")
KEYED_ROW = re.compile(r"^\|[^|]*\|\s*`([a-z_0-9.]+)`\s*\|\s*`([^`]*)`\s*\|")


def documented_values() -> dict[str, list[tuple[str, str]]]:
    """{experiment: [(config key, value as written), ...]} from the tables under each '## <experiment>' heading."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None and (match := KEYED_ROW.match(line)):
            sections[current].append((match.group(1), match.group(2)))
    return sections


def parse(text: str):
    """A documented value: null, true / false, a Python literal (number, list), else the string itself."""
    special = {"null": None, "true": True, "false": False}
    if text in special:
        return special[text]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def composed(spec, key: str):
    """The value of ``key`` in a validated run spec ('method.*' and 'train.*' from their dataclasses)."""
    section, _, rest = key.partition(".")
    node = {"method": spec.method_config, "train": spec.train}.get(section, spec.cfg[section])
    for part in rest.split("."):
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, part):
            return "???"
        node = node[part] if isinstance(node, DictConfig) else getattr(node, part)
    return list(node) if isinstance(node, (tuple, list)) else node


def same(actual, expected) -> bool:
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(expected, float) or (isinstance(expected, int) and not isinstance(expected, bool)):
        return not isinstance(actual, bool) and actual == pytest.approx(expected, rel=1e-12)
    return actual == expected


def test_every_paper_experiment_has_a_table_and_the_readme_links_it():
    sections = documented_values()
    assert set(PAPER_EXPERIMENTS) <= set(sections)
    assert all(len(sections[name]) >= 8 for name in PAPER_EXPERIMENTS)
    assert "docs/recipes.md" in (DOC.parent.parent / "README.md").read_text()


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_documented_values_are_what_the_experiment_composes_to(experiment):
    spec = compose([f"experiment={experiment}"])
    wrong = [(key, text, composed(spec, key)) for key, text in documented_values()[experiment]
             if not same(composed(spec, key), parse(text))]
    assert not wrong, f"docs/recipes.md disagrees with conf/experiment/{experiment}.yaml: {wrong}"


@pytest.mark.parametrize("experiment, weighting", [("sd15_fdistill", "x0"), ("sdxl_fdistill", "epsilon")])
def test_sd_fdistill_recipes_draw_teacher_timesteps_uniformly_and_clip_only_the_student(experiment, weighting):
    """With a tiny SD in place of the real one: noise levels are the teacher's timesteps 1..998 (t in [0.001, 0.999]),
    the fake score's loss is the official one, and only the student phase clips its gradient."""
    shrink = ["model=tiny_sd", "data=captioned_shapes", "data.num_images=8", "data.resolution=16", "train.device=cpu"]
    method = build_run(compose([f"experiment={experiment}", *shrink]), with_loggers=False).method
    table = method.frozen["teacher"].train_sigmas
    sigmas = method.sample_sigma(torch.rand(5000, generator=torch.Generator().manual_seed(0))).double()
    timesteps = (table.log()[None, :] - sigmas.log()[:, None]).abs().argmin(1)
    torch.testing.assert_close(table[timesteps], sigmas, rtol=1e-6, atol=0)
    assert (int(timesteps.min()), int(timesteps.max())) == (1, 998)
    assert method.config.fake_score_weighting == weighting
    clips = {phase.name: phase.max_grad_norm for phase in method.phases()}
    assert clips == {"student": 10.0, "critic": None}


@pytest.mark.parametrize("experiment", ["dpo_sd15", "dpo_sdxl", "sd3_dpo"])
def test_dpo_recipes_run_at_the_launchers_learning_rate(experiment):
    """lr 1e-8 per pair scaled by the global batch: 2.048e-5 at 2048 pairs, as the released launchers."""
    assert compose([f"experiment={experiment}"]).method_config.optimizer_lr() == pytest.approx(2.048e-5)
