"""DPM-Solver family, UniPC, DPM-Solver-v3 and DC-Solver samplers in sigma units (Lu et al. 2022, 2022b; Zhao et al. 2023), denoiser protocol.

    sigmas("karras", 20, 0.002, 80.0)                      # 21 decreasing noise levels, last = 0
    x = sample(denoiser, sigmas_[0] * torch.randn(...), sigmas_, solver="dpmpp_3m", cond=labels)
"""
from .config import SamplerConfig, as_sampler_config, noise_levels
from .sampling import SOLVERS, CountingDenoiser, generator_inputs, generator_sample, nfe, sample
from .recommend import RECOMMENDED_SOLVERS, recommended_solver
from .schedules import SIGMA_SCHEDULES, karras_sigmas, logsnr_sigmas, sigmas, time_uniform_sigmas
from .solvers import (dpm_solver_1, dpm_solver_2, dpm_solver_3, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s,
                      dpmpp_3m, dpmpp_3m_coefficients, dpmpp_3m_taylor, euler, heun, step_orders)
from .unipc import unipc
from .dpm_solver_v3 import dpm_solver_v3
from .ems import ModelStatistics, compute_ems
from .v3_calibration import calibrate_dpm_solver_v3
from .dc_solver import CascadeRegression, dc_solver, reference_trajectory, search_ratios

__all__ = [
    "SamplerConfig", "as_sampler_config", "noise_levels",
    "sigmas", "sample", "generator_inputs", "generator_sample", "SOLVERS", "SIGMA_SCHEDULES", "nfe", "CountingDenoiser", "step_orders",
    "karras_sigmas", "logsnr_sigmas", "time_uniform_sigmas", "dpmpp_3m_coefficients",
    "euler", "heun", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
    "dpmpp_3m_taylor", "unipc", "recommended_solver", "RECOMMENDED_SOLVERS",
    "dpm_solver_v3", "compute_ems", "ModelStatistics", "calibrate_dpm_solver_v3",
    "dc_solver", "search_ratios", "reference_trajectory", "CascadeRegression",
]
