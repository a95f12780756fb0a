"""The EDM (Karras et al. 2022) and EDM2 (Karras et al. 2024) networks, written from the papers: DDPM++ / NCSN++
(``SongUNet``), ADM (``DhariwalUNet``), the magnitude-preserving EDM2 U-Net (``EDM2UNet``), their preconditioning
(``EDMNetworkDenoiser``: fdistill's denoiser protocol) and model directories (``fdistill.edm.io``). The published
checkpoints convert with ``scripts/convert_edm.py``."""
from .adm import DhariwalUNet
from .edm2 import EDM2UNet
from .io import NETWORK_CLASSES, edm_model_from_config, load_edm_denoiser, save_edm_model
from .precond import EDMNetworkDenoiser, Preconditioning
from .songunet import SongUNet

__all__ = ["SongUNet", "DhariwalUNet", "EDM2UNet", "EDMNetworkDenoiser", "Preconditioning", "NETWORK_CLASSES",
           "edm_model_from_config", "load_edm_denoiser", "save_edm_model"]
