"""Few-step f-distill students (DMD2's multi-step generator with backward simulation): the chain, the training
sample's gradient, export / load / `fdistill sample`, and the text-to-image pipeline export."""
import json

import pytest
import torch

from fdistill.data import captioned_shapes
from fdistill.denoisers import load_denoiser
from fdistill.methods.base import StepContext
from fdistill.methods.fdistill import FDistillConfig, build
from fdistill.tiny_sd import tiny_sd_components
from fdistill.samplers import generator_inputs, generator_sample
from test_fdistill_method import points_data

MLP = {"_target_": "fdistill.networks.MLPDenoiser", "dim": 2, "hidden": 16, "depth": 1}
SIGMAS = [5.0, 1.0, 0.2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_chain_inputs_follow_the_recursion_for_each_samples_step():
    """x_1 = c z; x_{k+1} = G(x_k, sigma_k) + sigma_{k+1} eps_k, with G(x, sigma) = x / (1 + sigma) here."""
    def generator(x, sigma, cond):
        return x / (1 + sigma[:, None])

    z, renoise = torch.randn(3, 2), torch.randn(2, 3, 2)
    x, sigma = generator_inputs(generator, z, SIGMAS, 7.0, torch.tensor([0, 1, 2]), renoise)
    x1 = 7.0 * z
    x2 = x1 / 6.0 + 1.0 * renoise[0]
    x3 = x2 / 2.0 + 0.2 * renoise[1]
    torch.testing.assert_close(x, torch.stack([x1[0], x2[1], x3[2]]))
    torch.testing.assert_close(sigma, torch.tensor(SIGMAS))
    out = generator_sample(generator, z, SIGMAS, 7.0, renoise)
    torch.testing.assert_close(out, x3 / 1.2)


def test_training_sample_has_gradient_only_through_its_last_step():
    method = build(FDistillConfig(network=MLP, generator_sigmas=SIGMAS), None, points_data())
    item = method.prepare_step("student", [next(points_data().loader(8))], StepContext(0))[0]
    assert item.renoise.shape == (2, 8, 2) and set(item.generator_step.tolist()) <= {0, 1, 2}
    item.generator_step = torch.tensor([2] * 8)
    student = method.networks["student"]
    method.generated(item).square().sum().backward()
    via_method = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():                               # the first two steps of the chain, by hand
        x2 = student(5.0 * item.z, torch.full((8,), 5.0)) + 1.0 * item.renoise[0]
        x3 = student(x2, torch.full((8,), 1.0)) + 0.2 * item.renoise[1]
    student(x3, torch.full((8,), 0.2)).square().sum().backward()
    for got, expected in zip(via_method, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, expected)


def test_few_step_config_is_validated():
    with pytest.raises(ValueError, match="strictly decreasing"):
        FDistillConfig(generator_sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="not both"):
        FDistillConfig(generator_sigmas=[2.0, 1.0], generator_sigma=2.0)


def test_export_load_and_sample_command_run_the_same_chain(tmp_path):
    from fdistill.commands.sample import main

    method = build(FDistillConfig(network=MLP, generator_sigmas=SIGMAS), None, points_data()).eval()
    method.export(str(tmp_path / "gen"))
    info = json.loads((tmp_path / "gen" / "fdistill.json").read_text())
    assert info["generator_sigmas"] == SIGMAS and info["generator_sigma"] == 5.0
    generator, loaded = load_denoiser(tmp_path / "gen")
    assert loaded.generator_chain == tuple(SIGMAS)
    z, renoise = torch.randn(6, 2), torch.randn(2, 6, 2)
    with torch.no_grad():
        torch.testing.assert_close(generator_sample(generator, z, loaded.generator_chain,
                                                    loaded.generator_input_scale, renoise),
                                   method.student_sample(z, None, renoise))
    assert main(["--model", str(tmp_path / "gen"), "--num", "4", "--out", str(tmp_path / "out")]) == 0
    assert main(["--model", str(tmp_path / "gen"), "--steps", "1", "--out", str(tmp_path / "bad")]) == 2


def test_few_step_text_to_image_pipeline_reproduces_the_chain(tmp_path):
    import diffusers

    components = tiny_sd_components("sd15", image_size=8)
    data = captioned_shapes(8, resolution=8)
    with pytest.raises(ValueError, match="timesteps"):
        build(FDistillConfig(generator_sigmas=[14.0, 1.6]), components, data)
    method = build(FDistillConfig(generator_sigmas=[14.61465, 1.61289]), components, data).eval()
    assert method.domain.timesteps(method.generator_sigmas) == [999, 499]
    method.export(str(tmp_path / "model"))
    info = json.loads((tmp_path / "model" / "fdistill.json").read_text())
    assert info["diffusers_timesteps"] == [999, 499]
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(pipeline.scheduler).__name__ == "LCMScheduler"
    z = torch.randn(1, 4, 8, 8)
    latents = pipeline(["a red square"], latents=z, timesteps=info["diffusers_timesteps"], guidance_scale=1.0,
                       output_type="latent", height=8, width=8, generator=torch.Generator().manual_seed(5)).images
    renoise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))[None]   # the scheduler's draw
    with torch.no_grad():
        expected = method.student_sample(z, method.condition_of({"caption": ["a red square"]}, z.device), renoise)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
