"""scripts/convert_edm.py on pickles written in the published EDM / EDM2 format (torch_utils.persistence records:
module source + class name + state with _init_kwargs and tensors), built here from tiny networks: the converted
directory loads and denoises exactly as the network the pickle was made from; code in a pickle never runs."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fdistill.denoisers import load_denoiser
from fdistill.edm.checkpoint import convert_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_edm_networks import tiny_denoiser  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert_edm.py"


@pytest.fixture
def persistence(monkeypatch, tmp_path):
    """A stand-in ``torch_utils.persistence`` module, so pickle writes the published reconstruct call; unpickling
    it for real would run the module source (here: create a marker file)."""
    module = types.ModuleType("torch_utils.persistence")
    marker = tmp_path / "source-was-executed"

    def _reconstruct_persistent_obj(meta):          # what NVIDIA's loader does: exec the source
        exec(meta["module_src"], {})
        raise AssertionError("unreachable in these tests")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    module.marker = marker
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})      # NVIDIA's dict with attribute access
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = easydict
    monkeypatch.setitem(sys.modules, "dnnlib", types.ModuleType("dnnlib"))
    monkeypatch.setitem(sys.modules, "dnnlib.util", util)
    module.EasyDict = easydict
    return module


class Persisted:
    """Pickles as the published networks do: _reconstruct_persistent_obj(dict(type, version, module_src, class_name,
    state)) with state = the module's __dict__ (parameters, buffers, sub-modules, _init_kwargs)."""

    def __init__(self, persistence, class_name: str, state: dict):
        self.persistence, self.class_name, self.state = persistence, class_name, state

    def __reduce__(self):
        source = f"open({str(self.persistence.marker)!r}, 'w').write('ran')"
        meta = dict(type="class", version=6, module_src=source, class_name=self.class_name, state=self.state)
        return self.persistence._reconstruct_persistent_obj, (meta,)


def container(state: dict) -> nn.ModuleDict:
    """A real torch ModuleDict holding the persistence records (as in the published pickles)."""
    holder = nn.ModuleDict.__new__(nn.ModuleDict)
    holder.__dict__.update(state)
    return holder


def published_tree(module: nn.Module, persistence, class_name: str | None = None, extra: dict | None = None):
    """``module`` as the published pickles hold it: every fdistill module a persistence record with the same
    attribute names, ModuleDicts as torch containers."""
    children = OrderedDict((name, published_tree(child, persistence)) for name, child in module.named_children())
    state = {"training": False, "_parameters": OrderedDict(module._parameters), "_buffers": OrderedDict(module._buffers),
             "_non_persistent_buffers_set": set(), "_modules": children, **(extra or {})}
    if isinstance(module, nn.ModuleDict):
        return container(state)
    state.update(_init_args=(), _init_kwargs=getattr(module, "init_kwargs", {}), skip_scale=np.sqrt(0.5))
    return Persisted(persistence, class_name or type(module).__name__, state)


def write_edm_pickle(path: Path, net: nn.Module, persistence, precond_class: str, precond_kwargs: dict) -> None:
    kwargs = {k: v for k, v in net.init_kwargs.items() if k not in ("in_channels", "out_channels")}
    kwargs.update(img_channels=net.init_kwargs["in_channels"], model_type=type(net).__name__, use_fp16=False,
                  **precond_kwargs)
    ema = Persisted(persistence, precond_class, {"_parameters": OrderedDict(), "_buffers": OrderedDict(),
                                                 "_modules": OrderedDict(model=published_tree(net, persistence)),
                                                 "_init_kwargs": kwargs, "sigma_data": 0.5})
    loss = Persisted(persistence, "EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5})
    with open(path, "wb") as file:
        pickle.dump({"ema": ema, "loss_fn": loss, "augment_pipe": None,
                     "dataset_kwargs": persistence.EasyDict(resolution=8, use_labels=True)}, file)


def write_edm2_pickle(path: Path, net: nn.Module, persistence) -> None:
    logvar_fourier, logvar_linear = nn.Module(), nn.Module()
    logvar_fourier.register_buffer("freqs", torch.randn(8))
    logvar_fourier.register_buffer("phases", torch.rand(8))
    logvar_linear.weight = nn.Parameter(torch.randn(1, 8))
    modules = OrderedDict(unet=published_tree(net, persistence),
                          logvar_fourier=published_tree(logvar_fourier, persistence, "MPFourier"),
                          logvar_linear=published_tree(logvar_linear, persistence, "MPConv"))
    kwargs = dict(net.init_kwargs, use_fp16=True, sigma_data=0.5, logvar_channels=8)
    ema = Persisted(persistence, "Precond", {"_parameters": OrderedDict(), "_buffers": OrderedDict(),
                                             "_modules": modules, "_init_kwargs": kwargs})
    with open(path, "wb") as file:
        pickle.dump({"ema": ema, "loss_fn": None, "encoder": Persisted(persistence, "StandardRGBEncoder", {})}, file)


@pytest.mark.parametrize("name, precond_class, precond_kwargs, kind", [
    ("ddpmpp", "EDMPrecond", {"sigma_data": 0.5, "sigma_min": 0, "sigma_max": float("inf")}, "edm"),
    ("ncsnpp", "VEPrecond", {"sigma_min": 0.02, "sigma_max": 100}, "ve"),
    ("adm", "VPPrecond", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}, "vp"),
])
def test_edm_pickle_converts_to_the_same_denoiser_without_running_its_source(name, precond_class, precond_kwargs,
                                                                             kind, persistence, tmp_path):
    original = tiny_denoiser(name, {"kind": kind}, seed=3)
    write_edm_pickle(tmp_path / "net.pkl", original.net, persistence, precond_class, precond_kwargs)
    convert_checkpoint(tmp_path / "net.pkl", tmp_path / "converted")
    assert not persistence.marker.exists()
    converted, info = load_denoiser(tmp_path / "converted")
    assert converted.precond.kind == kind and info.num_classes == 4
    assert (info.sigma_min, info.sigma_max) == {"edm": (0.002, 80.0), "ve": (0.02, 80.0), "vp": (0.002, 80.0)}[kind]
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.05, 1.0, 30.0]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, sigma, labels), original(x, sigma, labels))
    for key, value in original.net.state_dict().items():
        assert torch.equal(converted.net.state_dict()[key], value), key


def test_edm2_pickle_converts_and_drops_the_log_variance_head(persistence, tmp_path):
    original = tiny_denoiser("edm2", seed=4)
    write_edm2_pickle(tmp_path / "edm2.pkl", original.net, persistence)
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "edm2.pkl"), str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    converted, info = load_denoiser(tmp_path / "out")
    assert type(converted.net).__name__ == "EDM2UNet" and not any("logvar" in k for k in converted.net.state_dict())
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 10.0]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, sigma, labels), original(x, sigma, labels))


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_calling_os_system_is_rejected_naming_the_global(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Evil(marker)}))
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "evil.pkl"), str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert f"refusing global '{os.system.__module__}.system'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unsupported_network_class_and_wrong_layout_fail_clearly(persistence, tmp_path):
    with open(tmp_path / "other.pkl", "wb") as file:
        pickle.dump({"ema": Persisted(persistence, "StyleGAN3", {"_init_kwargs": {}})}, file)
    with pytest.raises(ValueError, match=r"network class 'StyleGAN3' not supported; supported: \['EDMPrecond', "
                                         r"'Precond', 'VEPrecond', 'VPPrecond'\]"):
        convert_checkpoint(tmp_path / "other.pkl", tmp_path / "out")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict with a persisted network under 'ema', found list"):
        convert_checkpoint(tmp_path / "list.pkl", tmp_path / "out")
