"""Exact denoisers: no training, no download. They are the teachers of the tests and CPU benchmarks.

- ``GaussianMixtureDenoiser``: x0 ~ sum_k w_k N(mu_k, diag(s_k^2)); E[x0 | x] in closed form.
- ``EmpiricalDenoiser``: the ideal denoiser of a finite dataset (the data distribution is the sum of Diracs),
  E[x0 | x] = sum_n softmax_n(-||x - x_n||^2 / (2 sigma^2)) x_n  (Karras et al. 2022, Eq. 57 / App. B.3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import as_sigma_batch


class GaussianMixtureDenoiser(nn.Module):
    """Exact posterior mean of a Gaussian mixture under VE noise.

    Args:
        means: [K, D] component means (D = number of elements of one sample).
        stds: [K] isotropic or [K, D] diagonal component standard deviations (> 0).
        weights: [K] mixture weights (normalised here), default uniform.
        sample_shape: shape of one sample, prod(sample_shape) == D; default (D,).
        labels: optional [K] class of each component; with ``cond`` (class labels [B]) the posterior is restricted
            to the components of that class (a class-conditional teacher).

    For noise level sigma the noisy marginal is sum_k w_k N(mu_k, diag(s_k^2 + sigma^2)) and
    E[x0 | x] = sum_k p(k | x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)).
    Computation is in float64 when x is float64, otherwise float32.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None,
                 sample_shape: tuple[int, ...] | None = None, labels: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        num_components, dim = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 1:
            stds = stds[:, None].expand(num_components, dim)
        if stds.shape != (num_components, dim) or (stds <= 0).any():
            raise ValueError(f"stds must be positive, [K] or [K, D] = [{num_components}, {dim}]; got {tuple(stds.shape)}")
        weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be [K] = [{num_components}], non-negative, not all zero")
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (dim,)
        if math.prod(self.sample_shape) != dim:
            raise ValueError(f"sample_shape {self.sample_shape} does not have D = {dim} elements")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("labels", None if labels is None else torch.as_tensor(labels, dtype=torch.long))

    def _component_log_probs(self, x_flat: Tensor, sigma: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """log w_k + log N(x; mu_k, s_k^2 + sigma^2) -> [B, K], and the variances [B, K, D]."""
        dtype = x_flat.dtype
        var = self.stds.to(dtype)[None] ** 2 + sigma.to(dtype)[:, None, None] ** 2      # [B, K, D]
        diff = x_flat[:, None, :] - self.means.to(dtype)[None]                          # [B, K, D]
        log_normal = -0.5 * ((diff ** 2 / var).sum(-1) + var.log().sum(-1) + x_flat.shape[1] * math.log(2 * math.pi))
        logits = log_normal + self.weights.to(dtype).log()[None]
        if cond is not None:
            if self.labels is None:
                raise ValueError("this GaussianMixtureDenoiser has no component labels; pass labels= to condition on a class")
            allowed = self.labels[None, :] == torch.as_tensor(cond, device=x_flat.device)[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits, var

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = as_sigma_batch(sigma, x)
        x_flat = x.reshape(x.shape[0], -1).to(dtype)
        logits, var = self._component_log_probs(x_flat, sigma, cond)
        posterior = logits.softmax(dim=1)                                               # [B, K]
        means = self.means.to(dtype)[None]
        shrink = self.stds.to(dtype)[None] ** 2 / var                                   # [B, K, D]
        x0_given_k = means + shrink * (x_flat[:, None, :] - means)
        return (posterior[:, :, None] * x0_given_k).sum(1).reshape(x.shape)

    def log_density(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """log p_sigma(x) of the noisy marginal, [B] (exact; used as ground truth for density ratios)."""
        x_flat = x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))
        logits, _ = self._component_log_probs(x_flat, as_sigma_batch(sigma, x), cond)
        return logits.logsumexp(dim=1)

    def sample(self, num: int, generator: torch.Generator | None = None, return_components: bool = False):
        """Draw ``num`` clean samples [num, *sample_shape] (float32); optionally also their component indices."""
        device = self.means.device
        component = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn(num, self.means.shape[1], generator=generator, dtype=torch.float64, device=device)
        x = (self.means[component] + self.stds[component] * noise).float().reshape(num, *self.sample_shape)
        return (x, component) if return_components else x


class EmpiricalDenoiser(nn.Module):
    """The ideal (Bayes-optimal) denoiser of a finite dataset, computed exactly in chunks over the data.

    Args:
        data: [N, *shape] data points (the training set the denoiser memorises).
        labels: optional [N] class labels; with ``cond`` (labels [B]) the posterior is restricted to that class.
        chunk_size: data points per chunk; memory is O(B * chunk_size), so 10k+ images fit.

    softmax logits are (x . x_n - ||x_n||^2 / 2) / sigma^2 (the ||x||^2 term cancels), combined across chunks with
    a running log-sum-exp so the result equals the one-shot softmax.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, chunk_size: int = 4096):
        super().__init__()
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be [N, *shape] with N > 0, got shape {tuple(data.shape)}")
        self.sample_shape = tuple(data.shape[1:])
        self.chunk_size = int(chunk_size)
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        self.register_buffer("data", flat)
        self.register_buffer("half_sq_norms", 0.5 * (flat ** 2).sum(1))
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (data.shape[0],):
                raise ValueError(f"labels must be [N] = [{data.shape[0]}], got {tuple(labels.shape)}")
        self.register_buffer("labels", labels)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = as_sigma_batch(sigma, x).to(dtype)
        x_flat = x.reshape(x.shape[0], -1).to(dtype)
        inv_var = 1.0 / sigma[:, None] ** 2
        running_max = torch.full((x.shape[0], 1), float("-inf"), dtype=dtype, device=x.device)
        running_sum = torch.zeros_like(running_max)
        running_x0 = torch.zeros_like(x_flat)
        for start in range(0, self.data.shape[0], self.chunk_size):
            chunk = self.data[start:start + self.chunk_size].to(dtype)
            logits = (x_flat @ chunk.T - self.half_sq_norms[start:start + self.chunk_size].to(dtype)[None]) * inv_var
            if cond is not None:
                logits = logits.masked_fill(~self._class_mask(cond, start, x.device), float("-inf"))
            new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
            rescale = torch.exp(running_max - new_max).nan_to_num(0.0)   # 0 while no finite logit has been seen
            weights = torch.exp(logits - new_max).nan_to_num(0.0)
            running_sum = running_sum * rescale + weights.sum(1, keepdim=True)
            running_x0 = running_x0 * rescale + weights @ chunk
            running_max = new_max
        if (running_sum == 0).any():
            raise ValueError("EmpiricalDenoiser: a requested class has no data points")
        return (running_x0 / running_sum).reshape(x.shape)

    def _class_mask(self, cond: Tensor, start: int, device: torch.device) -> Tensor:
        if self.labels is None:
            raise ValueError("this EmpiricalDenoiser has no labels; pass labels= to condition on a class")
        chunk_labels = self.labels[start:start + self.chunk_size]
        return chunk_labels[None, :] == torch.as_tensor(cond, device=device)[:, None]
