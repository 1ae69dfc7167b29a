"""Independent formula-level references, written literally from the papers' definitions.

Nothing here imports normkit. Each reference is a small state machine written the slow, obvious
way (explicit loops over domains and samples, two-stage forms instead of folded ones), in the
input's dtype; the tests run them in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def bn_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and count of values per channel."""
    dims = channel_dims(x)
    mean = x.mean(dim=dims)
    centred = x - mean.reshape(1, -1, *([1] * (x.dim() - 2)))
    var = (centred * centred).mean(dim=dims)
    return mean, var, x.numel() // x.shape[1]


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over ``x`` (N, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


class RefConditionalBN:
    """Literal SaBN / CCBN / AuxBN: BN, then shared affine, then the sample's domain affine.

    ``split``: statistics per domain. ``weight``/``bias``: shared affine or None.
    ``domain_weight``/``domain_bias``: (K, C) or None.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        *,
        split: bool,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.k, self.c, self.split, self.eps, self.momentum = (
            num_domains,
            num_features,
            split,
            eps,
            momentum,
        )
        rows = num_domains if split else 1
        self.running_mean = torch.zeros(rows, num_features, dtype=dtype)
        self.running_var = torch.ones(rows, num_features, dtype=dtype)
        self.tracked = [0] * rows

    def _update(self, row: int, mean: Tensor, var: Tensor, count: int) -> None:
        self.tracked[row] += 1
        m = 1.0 / self.tracked[row] if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1)
        self.running_mean[row] = (1 - m) * self.running_mean[row] + m * mean
        self.running_var[row] = (1 - m) * self.running_var[row] + m * unbiased

    def __call__(
        self,
        x: Tensor,
        domain: Tensor,
        *,
        training: bool,
        weight: Tensor | None,
        bias: Tensor | None,
        domain_weight: Tensor | None,
        domain_bias: Tensor | None,
    ) -> Tensor:
        xhat = torch.empty_like(x)
        if self.split:
            for k in range(self.k):
                sel = (domain == k).nonzero().flatten()
                if len(sel) == 0:
                    continue
                xk = x[sel]
                if training:
                    mean, var, count = bn_moments(xk)
                    self._update(k, mean, var, count)
                else:
                    mean, var = self.running_mean[k], self.running_var[k]
                xhat[sel] = (xk - bcast(mean, xk)) / torch.sqrt(bcast(var, xk) + self.eps)
        else:
            if training:
                mean, var, count = bn_moments(x)
                self._update(0, mean, var, count)
            else:
                mean, var = self.running_mean[0], self.running_var[0]
            xhat = (x - bcast(mean, x)) / torch.sqrt(bcast(var, x) + self.eps)
        h = xhat
        if weight is not None and bias is not None:
            h = bcast(weight, x) * h + bcast(bias, x)
        if domain_weight is None or domain_bias is None:
            return h
        out = torch.empty_like(h)
        for n in range(x.shape[0]):
            k = int(domain[n])
            g = domain_weight[k].reshape(-1, *([1] * (x.dim() - 2)))
            b = domain_bias[k].reshape(-1, *([1] * (x.dim() - 2)))
            out[n] = g * h[n] + b
        return out


def group_standardize(x: Tensor, groups: int, eps: float) -> Tensor:
    """Per-(sample, group) standardization with the biased variance (GN without affine)."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=2, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


class RefBCN:
    """Literal two-stage BCN: a BN (or the estimated-statistics BN), then a group part."""

    def __init__(
        self,
        num_features: int,
        groups: int,
        *,
        estimate: bool = False,
        rate: float = 0.01,
        eps: float = 1e-5,
        momentum: float = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.groups, self.estimate, self.rate, self.eps, self.momentum = (
            groups,
            estimate,
            rate,
            eps,
            momentum,
        )
        self.running_mean = torch.zeros(num_features, dtype=dtype)
        self.running_var = torch.ones(num_features, dtype=dtype)

    def __call__(
        self,
        x: Tensor,
        *,
        training: bool,
        weight: Tensor,
        bias: Tensor,
        group_weight: Tensor,
        group_bias: Tensor,
    ) -> Tensor:
        if self.estimate:
            if training:
                with torch.no_grad():
                    dims = channel_dims(x)
                    m = x.mean(dim=dims)
                    v = ((x - bcast(self.running_mean, x)) ** 2).mean(dim=dims)
                    self.running_mean = (1 - self.rate) * self.running_mean + self.rate * m
                    self.running_var = (1 - self.rate) * self.running_var + self.rate * v
            mean, var = self.running_mean, self.running_var
        elif training:
            mean, var, count = bn_moments(x)
            with torch.no_grad():
                self.running_mean = (
                    1 - self.momentum
                ) * self.running_mean + self.momentum * mean.detach()
                self.running_var = (
                    1 - self.momentum
                ) * self.running_var + self.momentum * var.detach() * count / (count - 1)
        else:
            mean, var = self.running_mean, self.running_var
        x1 = bcast(weight, x) * (x - bcast(mean, x)) / torch.sqrt(bcast(var, x) + self.eps)
        x1 = x1 + bcast(bias, x)
        z = group_standardize(x1, self.groups, self.eps)
        if group_weight.shape[0] == self.groups:  # one affine per group, as the official code
            n = x.shape[0]
            zg = z.reshape(n, self.groups, -1)
            out = zg * group_weight.reshape(1, -1, 1) + group_bias.reshape(1, -1, 1)
            return out.reshape(x.shape)
        return z * bcast(group_weight, x) + bcast(group_bias, x)


# Related methods (issue 8): one section per family, each edited only by its own author.
# -- renorm / batch-group references --
# -- mabn references --
# -- iternorm / bnet references --
# -- frn / evonorm references --
# -- groupnorm / frozen / residual-gate / agc references --
