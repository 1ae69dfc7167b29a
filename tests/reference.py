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


def renorm_limit(step: int, start: float, target: float, warmup: int, end: int) -> float:
    """Batch Renorm's clip limit at training step ``step`` (counted from 0): ``start`` (1 for
    r_max, 0 for d_max) for the first ``warmup`` steps, ``target`` from step ``end`` on, and a
    straight line in between, from ``start`` at the last warm-up step to ``target`` at ``end``."""
    if step < warmup:
        return start
    if step >= end:
        return target
    return start + (target - start) * (step - (warmup - 1)) / (end - (warmup - 1))


class RefBatchRenorm:
    """Literal Algorithm 1 of Ioffe (2017), with normkit's running statistics.

    Training: ``r = clip(σ_B/σ)``, ``d = clip((μ_B − μ)/σ)`` from the running values *before*
    the batch, ``x̂ = (x − μ_B)/σ_B · r + d``, then the running update (PyTorch momentum,
    unbiased variance; σ = sqrt(running_var + eps)). ``stop_gradient=False`` keeps r and d in
    the graph (the variant the layer must not compute). Eval: a plain batch norm.
    """

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float,
        d_max: float,
        warmup: int,
        r_max_steps: int,
        d_max_steps: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.r_max, self.d_max, self.eps, self.momentum = r_max, d_max, eps, momentum
        self.warmup, self.r_max_steps, self.d_max_steps = warmup, r_max_steps, d_max_steps
        self.running_mean = torch.zeros(num_features, dtype=dtype)
        self.running_var = torch.ones(num_features, dtype=dtype)
        self.step = 0
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None

    def limits(self) -> tuple[float, float]:
        r = renorm_limit(self.step, 1.0, self.r_max, self.warmup, self.r_max_steps)
        d = renorm_limit(self.step, 0.0, self.d_max, self.warmup, self.d_max_steps)
        return r, d

    def __call__(
        self,
        x: Tensor,
        *,
        training: bool,
        weight: Tensor | None,
        bias: Tensor | None,
        stop_gradient: bool = True,
    ) -> Tensor:
        if training:
            mean, var, count = bn_moments(x)
            sigma_b = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.running_var + self.eps)
            r_lim, d_lim = self.limits()
            r = torch.clamp(sigma_b / sigma, 1.0 / r_lim, r_lim)
            d = torch.clamp((mean - self.running_mean) / sigma, -d_lim, d_lim)
            if stop_gradient:
                r, d = r.detach(), d.detach()
            self.last_r, self.last_d = r.detach(), d.detach()
            xhat = (x - bcast(mean, x)) / bcast(sigma_b, x) * bcast(r, x) + bcast(d, x)
            m = self.momentum
            unbiased = var.detach() * count / (count - 1)
            self.running_mean = (1 - m) * self.running_mean + m * mean.detach()
            self.running_var = (1 - m) * self.running_var + m * unbiased
            self.step += 1
        else:
            sigma = torch.sqrt(self.running_var + self.eps)
            xhat = (x - bcast(self.running_mean, x)) / bcast(sigma, x)
        if weight is None or bias is None:
            return xhat
        return bcast(weight, x) * xhat + bcast(bias, x)


class RefBatchGroupNorm:
    """Literal BGN as normkit reads it: group g is channels ``g·C/G … (g+1)·C/G − 1`` with all
    their spatial positions; each group is standardized with the mean and biased variance of its
    values over the whole batch (running group statistics in eval), then a per-channel affine."""

    def __init__(
        self,
        num_features: int,
        groups: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.groups, self.eps, self.momentum = groups, eps, momentum
        self.per_group = num_features // groups
        self.running_mean = torch.zeros(groups, dtype=dtype)
        self.running_var = torch.ones(groups, dtype=dtype)
        self.tracked = 0

    def __call__(
        self, x: Tensor, *, training: bool, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        k = self.per_group
        if training:
            self.tracked += 1
        m = 1.0 / self.tracked if self.momentum is None else self.momentum
        pieces = []
        for g in range(self.groups):
            block = x[:, g * k : (g + 1) * k]
            if training:
                mean = block.mean()
                var = ((block - mean) ** 2).mean()
                count = block.numel()
                with torch.no_grad():
                    unbiased = var * count / (count - 1)
                    self.running_mean[g] = (1 - m) * self.running_mean[g] + m * mean
                    self.running_var[g] = (1 - m) * self.running_var[g] + m * unbiased
            else:
                mean, var = self.running_mean[g], self.running_var[g]
            pieces.append((block - mean) / torch.sqrt(var + self.eps))
        xhat = torch.cat(pieces, dim=1)
        if weight is None or bias is None:
            return xhat
        return bcast(weight, x) * xhat + bcast(bias, x)


# -- mabn references --
def uncentred_bn(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """BN without centring, ``γ x / sqrt(mean_{N,H,W}(x²) + ε) + β``, through autograd."""
    second_moment = (x * x).mean(dim=channel_dims(x))
    return bcast(weight, x) * x / torch.sqrt(bcast(second_moment, x) + eps) + bcast(bias, x)


class RefMABN:
    """Literal MABN (Yan et al. 2020; the official ``MABN2d``), forward and its own backward.

    The official step order: count the step, write ``mean(x²)`` into ring row ``step mod m``,
    take the current value in warm-up (``step <= m`` or ``step < warmup``) or the ring's mean,
    compute ``r`` from the old running variance, then update it. ``momentum`` weighs the new
    value (PyTorch's convention; the official 0.98 on the old value is 0.02 here). The backward
    is written from the paper's formula: ``g = γ r dy``, ``gz = mean(g z)`` into the second
    ring, ``dx = (g − z · mean_gz) / sqrt(ψ² + ε)``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        buffer_size: int,
        warmup_iters: int,
        r_clamp_steps: int,
        r_min: float = 0.2,
        r_max: float = 5.0,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.m, self.warmup, self.r_steps = buffer_size, warmup_iters, r_clamp_steps
        self.r_min, self.r_max, self.eps, self.momentum = r_min, r_max, eps, momentum
        self.iters = 0
        self.running_var = torch.ones(num_features, dtype=dtype)
        self.buffer_x2 = torch.zeros(buffer_size, num_features, dtype=dtype)
        self.buffer_gz = torch.zeros(buffer_size, num_features, dtype=dtype)
        self.saved: list[dict[str, object]] = []

    def _warm(self, step: int) -> bool:
        return step <= self.m or step < self.warmup

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor, *, training: bool) -> Tensor:
        """The output; a training step also updates the state and remembers what its
        :meth:`backward` needs (steps are backpropagated oldest first)."""
        if not training:
            return bcast(weight, x) * x / torch.sqrt(bcast(self.running_var, x) + self.eps) + (
                bcast(bias, x)
            )
        self.iters += 1
        step = self.iters
        x2 = (x * x).mean(dim=channel_dims(x))
        self.buffer_x2[step % self.m] = x2
        var = x2 if self._warm(step) else self.buffer_x2.mean(dim=0)
        z = x / torch.sqrt(bcast(var, x) + self.eps)
        if step <= self.r_steps:
            r = torch.ones_like(var)
        else:
            ratio = torch.sqrt(var + self.eps) / torch.sqrt(self.running_var + self.eps)
            r = ratio.clamp(self.r_min, self.r_max)
        rate = 1.0 / step if self.momentum is None else self.momentum
        self.running_var = (1 - rate) * self.running_var + rate * var
        self.saved.append({"step": step, "z": z, "var": var, "r": r, "weight": weight})
        return bcast(weight, x) * bcast(r, x) * z + bcast(bias, x)

    def backward(self, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dx, dγ, dβ)`` of the oldest training step not yet backpropagated."""
        s = self.saved.pop(0)
        step, z, var, r, weight = s["step"], s["z"], s["var"], s["r"], s["weight"]
        assert isinstance(step, int)
        assert isinstance(z, Tensor) and isinstance(var, Tensor)
        assert isinstance(r, Tensor) and isinstance(weight, Tensor)
        dims = channel_dims(dy)
        g = dy * bcast(weight, dy) * bcast(r, dy)
        gz = (g * z).mean(dim=dims)
        self.buffer_gz[step % self.m] = gz
        mean_gz = gz if self._warm(step) else self.buffer_gz.mean(dim=0)
        dx = (g - z * bcast(mean_gz, dy)) / torch.sqrt(bcast(var, dy) + self.eps)
        return dx, (dy * bcast(r, dy) * z).sum(dim=dims), dy.sum(dim=dims)


# -- iternorm / bnet references --


class RefIterNorm:
    """Literal IterNorm (Huang et al. 2019, Algorithm 1), one group of channels at a time.

    Training: ``X_c = X − μ``, ``Σ = X_c X_cᵀ / M + εI``, ``Σ_N = Σ / tr Σ``, ``P_0 = I``,
    ``P_k = (3 P_{k−1} − P_{k−1}³ Σ_N) / 2``, ``W = P_T / sqrt(tr Σ)``; the running mean and
    the running W move by ``momentum`` towards the batch's (``None``: cumulative). Eval uses
    them. Then ``y = γ (W X_c) + β`` per channel.
    """

    def __init__(
        self,
        num_features: int,
        group_size: int,
        *,
        T: int = 5,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.c, self.d, self.T, self.eps, self.momentum = (
            num_features,
            group_size,
            T,
            eps,
            momentum,
        )
        groups = num_features // group_size
        self.running_mean = torch.zeros(num_features, dtype=dtype)
        self.running_wm = torch.stack([torch.eye(group_size, dtype=dtype)] * groups)
        self.tracked = 0

    def whitening(self, xg: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(d, 1)`` and whitening matrix ``(d, d)`` of one group ``xg`` ``(d, M)``."""
        mu = xg.mean(dim=1, keepdim=True)
        xc = xg - mu
        eye = torch.eye(self.d, dtype=xg.dtype)
        sigma = xc @ xc.t() / xg.shape[1] + self.eps * eye
        trace = torch.trace(sigma)
        sigma_n = sigma / trace
        p = eye
        for _ in range(self.T):
            p = 0.5 * (3 * p - p @ p @ p @ sigma_n)
        return mu, p / torch.sqrt(trace)

    def __call__(
        self, x: Tensor, *, training: bool, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        xt = x.transpose(0, 1).reshape(self.c, -1)  # (C, N · positions)
        if training:
            self.tracked += 1
        m = (1.0 / self.tracked if self.momentum is None else self.momentum) if training else 0.0
        rows = []
        for g in range(self.c // self.d):
            sel = slice(g * self.d, (g + 1) * self.d)
            if training:
                mu, w = self.whitening(xt[sel])
                with torch.no_grad():
                    self.running_mean[sel] = (1 - m) * self.running_mean[sel] + m * mu[:, 0]
                    self.running_wm[g] = (1 - m) * self.running_wm[g] + m * w
            else:
                mu, w = self.running_mean[sel].unsqueeze(1), self.running_wm[g]
            rows.append(w @ (xt[sel] - mu))
        y = torch.cat(rows).reshape(self.c, x.shape[0], *x.shape[2:]).transpose(0, 1)
        if weight is not None and bias is not None:
            y = bcast(weight, x) * y + bcast(bias, x)
        return y


class RefBNET:
    """Literal BNET (Xu et al. 2023): BN without affine, then a depthwise k × k
    cross-correlation of the zero-padded normalized input, written as a sum over the taps."""

    def __init__(
        self,
        num_features: int,
        kernel_size: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.k, self.eps, self.momentum = kernel_size, eps, momentum
        self.running_mean = torch.zeros(num_features, dtype=dtype)
        self.running_var = torch.ones(num_features, dtype=dtype)
        self.tracked = 0

    def __call__(self, x: Tensor, *, training: bool, weight: Tensor, bias: Tensor) -> Tensor:
        if training:
            mean, var, count = bn_moments(x)
            self.tracked += 1
            m = 1.0 / self.tracked if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean = (1 - m) * self.running_mean + m * mean
                self.running_var = (1 - m) * self.running_var + m * var * count / (count - 1)
        else:
            mean, var = self.running_mean, self.running_var
        xhat = (x - bcast(mean, x)) / torch.sqrt(bcast(var, x) + self.eps)
        p = self.k // 2
        h, w = x.shape[2], x.shape[3]
        padded = torch.nn.functional.pad(xhat, (p, p, p, p))
        out = bcast(bias, x).expand_as(xhat).clone()
        for i in range(self.k):
            for j in range(self.k):
                tap = weight[:, 0, i, j]
                out = out + bcast(tap, x) * padded[:, :, i : i + h, j : j + w]
        return out


# -- frn / evonorm references --


def ref_frn(
    x: Tensor,
    *,
    eps: Tensor | float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    tau: Tensor | None = None,
) -> Tensor:
    """Literal FRN (Singh & Krishnan 2020), then TLU when ``tau`` is given, one map at a time.

    For each sample n and channel c: ν² = mean of x[n, c]² over its spatial positions (the value
    itself for (N, C) input), x̂ = x / sqrt(ν² + ε), y = γ x̂ + β, z = max(y, τ). ``eps`` is the
    whole ε (a tensor when it is learned).
    """
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[n, c]
            nu2 = (v * v).mean()
            y = v / torch.sqrt(nu2 + eps)
            if weight is not None and bias is not None:
                y = weight[c] * y + bias[c]
            if tau is not None:
                y = torch.maximum(y, tau[c])
            out[n, c] = y
    return out


class RefEvoNormB0:
    """Literal EvoNorm-B0 (Liu et al. 2020) with its running variance, one map at a time.

    Training: batch variance (biased) per channel over (N, H, W); the running variance moves by
    ``momentum`` (or 1/t, cumulative) towards the unbiased one. Eval: the running variance.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.eps, self.momentum = eps, momentum
        self.running_var = torch.ones(num_features, dtype=dtype)
        self.tracked = 0

    def __call__(
        self,
        x: Tensor,
        *,
        training: bool,
        v: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        if training:
            _, var, count = bn_moments(x)
            self.tracked += 1
            m = 1.0 / self.tracked if self.momentum is None else self.momentum
            with torch.no_grad():
                unbiased = var.detach() * count / (count - 1)
                self.running_var = (1 - m) * self.running_var + m * unbiased
        else:
            var = self.running_var
        out = torch.empty_like(x)
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                xc = x[n, c]
                instance_var = ((xc - xc.mean()) ** 2).mean()
                left = torch.sqrt(var[c] + self.eps)
                right = v[c] * xc + torch.sqrt(instance_var + self.eps)
                y = xc / torch.maximum(left, right)
                if weight is not None and bias is not None:
                    y = y * weight[c] + bias[c]
                out[n, c] = y
        return out


def ref_evonorm_s0(
    x: Tensor,
    groups: int,
    *,
    eps: float,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Literal EvoNorm-S0 (Liu et al. 2020): x·sigmoid(v·x) / sqrt(var + ε) · γ + β, with the
    biased variance of each sample's group of C/G consecutive channels and their positions."""
    per = x.shape[1] // groups
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, g * per : (g + 1) * per]
            std = torch.sqrt(((block - block.mean()) ** 2).mean() + eps)
            for c in range(g * per, (g + 1) * per):
                y = x[n, c] * torch.sigmoid(v[c] * x[n, c]) / std
                if weight is not None and bias is not None:
                    y = y * weight[c] + bias[c]
                out[n, c] = y
    return out


# -- groupnorm / frozen / residual-gate / agc references --


def ref_group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Literal GN (Wu & He 2018): for each sample and each group of C/G consecutive channels,
    subtract the mean and divide by sqrt(biased variance + eps) over the group's values at every
    position, then a per-channel affine. Loops over samples and groups."""
    per_group = x.shape[1] // groups
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, g * per_group : (g + 1) * per_group]
            mean = block.mean()
            var = ((block - mean) ** 2).mean()
            out[n, g * per_group : (g + 1) * per_group] = (block - mean) / torch.sqrt(var + eps)
    if weight is None or bias is None:
        return out
    return bcast(weight, x) * out + bcast(bias, x)


def ref_frozen_bn(
    x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float
) -> Tensor:
    """An eval-mode batch norm in its two-stage form (normalize with the running statistics,
    then the affine), the function a frozen batch norm must compute."""
    xhat = (x - bcast(mean, x)) / torch.sqrt(bcast(var, x) + eps)
    return bcast(weight, x) * xhat + bcast(bias, x)


def ref_agc(weight: Tensor, grad: Tensor, clip: float, eps: float) -> Tensor:
    """The clipped gradient of AGC (Brock et al. 2021), one output unit at a time: unit i is
    ``weight[i]`` for a tensor of 2 or more dimensions, the whole tensor otherwise; if
    ||G_i|| / max(||W_i||, eps) > clip, then G_i <- clip * max(||W_i||, eps) / ||G_i|| * G_i."""
    if weight.dim() <= 1:
        units = [(weight, grad)]
    else:
        units = [(weight[i], grad[i]) for i in range(weight.shape[0])]
    clipped = []
    for w, g in units:
        w_norm = max(float(torch.sqrt((w * w).sum())), eps)
        g_norm = float(torch.sqrt((g * g).sum()))
        if g_norm / w_norm > clip:
            g = g * (clip * w_norm / g_norm)
        clipped.append(g)
    if weight.dim() <= 1:
        return clipped[0]
    return torch.stack(clipped)
