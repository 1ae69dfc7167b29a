"""The batch-norm core shared by normkit's BN-derived layers.

``_BatchNormCore`` computes statistics (shared, or per domain), optionally over every rank of
``torch.distributed``, updates the running buffers, and applies one folded per-(sample, channel)
scale-and-shift that combines normalization, an optional shared affine and an optional
per-domain affine. Sandwich BN, CCBN, AuxBN, :class:`SyncBatchNorm` and InputNorm are thin
subclasses that fix which parts exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import _fused, kernels
from normkit import functional as F
from normkit._checks import (
    check_batch_values,
    check_count,
    check_dtype,
    check_flags,
    check_index,
    check_input,
    check_momentum,
    check_nonnegative,
    check_positive,
)
from normkit._fused import (
    batch_norm_train,
    core_kernel,
    fast_paths_apply,
    kernel_call_applies,
    moment_scale_shift,
    norm_affine,
    sample_moments,
)
from normkit._stats import Synchronized, sync_moments, track_batch_
from normkit.conditioning import _ContextDomain

__all__ = ["DomainIndex", "SyncBatchNorm"]

DomainIndex = int | Tensor


class _BatchNormCore(Synchronized, _BatchNorm):
    """Statistics (shared or per domain, local or synchronized), then one folded affine.

    Subclasses choose the parts (``affine`` for the shared affine, ``domain_affine``,
    ``split_stats``) and the accepted ranks. Subclassing ``_BatchNorm`` keeps the checkpoint
    names and lets tools that look for batch norms (``torch.optim.swa_utils.update_bn``, freeze
    helpers, ``bn_param_groups``) find these layers.

    Synchronization: with ``sync=True`` (set by :func:`normkit.convert_sync`), batch statistics
    in training are merged over every rank of ``process_group`` with one differentiable
    all-reduce per forward; it is a no-op when ``torch.distributed`` is not initialized or has one
    rank.
    """

    _ranks: tuple[int, ...] = (4,)
    #: Whether :func:`normkit.condition` passes this layer an index.
    takes_domain = False
    #: The index used when forward gets none: the innermost open :func:`normkit.condition`
    #: block's in the calling thread, else one assigned to the attribute, else None.
    context_domain = _ContextDomain()
    #: Fused kernels for batch statistics in training (see :mod:`normkit._fused`); False runs
    #: the reference path, the formula written out step by step (for tests and debugging).
    fast = True
    num_domains: int
    split_stats: bool
    domain_std: float
    shared_std: float
    domain_weight: nn.Parameter | None
    domain_bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        split_stats: bool = False,
        domain_affine: bool = True,
        domain_std: float = 0.02,
        shared_std: float = 0.0,
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_count(name, "num_domains", num_domains)
        check_positive(name, "eps", eps)
        check_momentum(name, momentum)
        check_nonnegative(name, "domain_std", domain_std)
        check_nonnegative(name, "shared_std", shared_std)
        check_flags(
            name,
            affine=affine,
            track_running_stats=track_running_stats,
            split_stats=split_stats,
            domain_affine=domain_affine,
        )
        check_dtype(name, dtype)
        factory = {"device": device, "dtype": dtype}
        self.num_domains = num_domains
        self.split_stats = split_stats
        self.domain_std = domain_std
        self.shared_std = shared_std
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        if split_stats and track_running_stats:
            shape = (num_domains, num_features)
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.zeros(num_domains, dtype=torch.long, device=device),
            )
        if domain_affine:
            shape = (num_domains, num_features)
            self.domain_weight = nn.Parameter(torch.empty(shape, **factory))
            self.domain_bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("domain_weight", None)
            self.register_parameter("domain_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Running statistics to (0, 1); shared affine to (1, 0) or N(1, shared_std) and 0;
        per-domain scales to N(1, domain_std) (exactly 1 when the std is 0), shifts to 0."""
        super().reset_parameters()
        if self.affine and self.shared_std > 0:
            with torch.no_grad():
                self.weight.normal_(1.0, self.shared_std)
        # _BatchNorm.__init__ calls this before the per-domain affine exists.
        domain_weight = getattr(self, "domain_weight", None)
        domain_bias = getattr(self, "domain_bias", None)
        if domain_weight is not None and domain_bias is not None:
            with torch.no_grad():
                if self.domain_std > 0:
                    domain_weight.normal_(1.0, self.domain_std)
                else:
                    domain_weight.fill_(1.0)
                domain_bias.zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self._ranks, self.num_features)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A plain batch norm's checkpoint maps onto this layer: per-channel statistics go to
        # every domain when statistics are split, and a BN affine becomes every domain's affine
        # when the layer has no shared one, so that the loaded layer computes the same function
        # as the batch norm did for every domain.
        k, c = self.num_domains, self.num_features
        if self.split_stats and self.running_mean is not None:
            for key in ("running_mean", "running_var"):
                t = state_dict.get(prefix + key)
                if isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == c:
                    state_dict[prefix + key] = t.unsqueeze(0).expand(k, c).clone()
            t = state_dict.get(prefix + "num_batches_tracked")
            if isinstance(t, Tensor) and t.dim() == 0:
                state_dict[prefix + "num_batches_tracked"] = t.expand(k).clone()
            # Version 1 (torch's BN before num_batches_tracked existed): the count is missing and
            # the layer keeps its own, as torch's migration does for a (C,) layer (``_version``
            # is _BatchNorm's, 2; normkit's layouts have not changed since).
            version = local_metadata.get("version")
            key = prefix + "num_batches_tracked"
            if (version is None or version < 2) and key not in state_dict:
                own = self.num_batches_tracked
                usable = own is not None and own.device.type != "meta"
                state_dict[key] = own if usable else torch.zeros(k, dtype=torch.long)
        has_domain = self.domain_weight is not None
        if not self.affine and has_domain and prefix + "domain_weight" not in state_dict:
            w, b = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
            if isinstance(w, Tensor) and isinstance(b, Tensor) and w.shape == (c,):
                state_dict[prefix + "domain_weight"] = w.unsqueeze(0).expand(k, c).clone()
                state_dict[prefix + "domain_bias"] = b.unsqueeze(0).expand(k, c).clone()
                del state_dict[prefix + "weight"], state_dict[prefix + "bias"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, "
            f"momentum={self.momentum}, track_running_stats={self.track_running_stats}"
        )
        if type(self)._shows_affine:
            s += f", affine={self.affine}"
        if type(self)._shows_split:
            s += f", split_stats={self.split_stats}"
        s += f", domain_std={self.domain_std}"
        return s + self._sync_repr()

    _shows_affine = True
    _shows_split = True

    def _replicate_for_data_parallel(self) -> Any:
        # DataParallel runs its replicas in worker threads, which do not see the calling thread's
        # open normkit.condition blocks: a replica keeps the index active when it is made.
        replica = super()._replicate_for_data_parallel()
        replica.context_domain = self.context_domain
        return replica

    @property
    def _needs_domain(self) -> bool:
        return self.split_stats or self.domain_weight is not None

    def forward(self, input: Tensor, domain: DomainIndex | None = None) -> Tensor:
        if kernels.is_enabled():
            out = self._kernel_call(input, domain)
            if out is not None:
                return out
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        if self._needs_domain:
            if domain is None:
                domain = self.context_domain
            if domain is None:
                raise ValueError(
                    f"{name}: expected a domain index, got None; call layer(x, domain) with an "
                    "int or a LongTensor of shape (N,), or run the model inside "
                    "`with normkit.condition(model, domain):`"
                )
            check_index(name, domain, self.num_domains, input.shape[0], input.device)
            if isinstance(domain, Tensor) and (
                domain.dtype != torch.long or domain.device != input.device
            ):
                domain = domain.to(device=input.device, dtype=torch.long)
        else:
            domain = 0
        syncing = self._syncing()
        if syncing:
            fields = {
                "num_features": self.num_features,
                "num_domains": self.num_domains,
                "split_stats": int(self.split_stats),
            }
            self._verify_peers(fields, input.device)
        if self.training and not syncing:
            # Under sync a rank may hold one value per channel (or none): the global batch
            # decides, as in torch's SyncBatchNorm.
            check_batch_values(name, input)

        use_batch = self.training or self.running_mean is None
        params = self._affines()
        if use_batch and self.fast and not syncing and fast_paths_apply(input):
            out = self._fast(input, domain, params)
            if out is not None:
                return out
        if self.split_stats:
            mean, var = self._split_statistics(input, domain, use_batch, syncing)
        else:
            mean, var = self._shared_statistics(input, use_batch, syncing)
        scale, shift = self._fold(mean, var, domain, *params)
        return F.apply_scale_shift(input, scale, shift)

    def _kernel_call(self, x: Tensor, domain: DomainIndex | None) -> Tensor | None:
        """The usual training forward with the kernels on, as one call of the compiled kernel
        (``core_train``: the output only; the running statistics updated inside) and only the
        checks the kernel does not make itself; None for anything else, which :meth:`forward`'s
        full path then handles (and names any error of): eval, synchronized statistics,
        tracing, a rank or channel count the layer refuses, a single value per channel,
        parameters or buffers in another dtype than the input, an affine pair with one half
        missing, a partial set of running buffers or a strided one, an index that is not a CPU
        LongTensor. The kernel checks the index values and the affine shapes before anything
        changes; a failure there gets the layer's named error from :func:`check_index`.

        Parameters and buffers are read from the module's dictionaries (``nn.Module``'s
        attribute lookup costs more per call than a small kernel); a parametrized one is
        absent there, and the full path runs.
        """
        if not kernel_call_applies(self, x):
            return None
        try:
            p, b = self._parameters, self._buffers
            w, bias, dw, db = p["weight"], p["bias"], p["domain_weight"], p["domain_bias"]
            rm, rv, counts = b["running_mean"], b["running_var"], b["num_batches_tracked"]
        except KeyError:
            return None
        if not self._tracking():  # buffers kept but not tracked: none for the kernel
            rm = rv = counts = None
        if not (
            kernels.in_dtype_already(x.dtype, w, bias, dw, db, rm, rv)
            and kernels.affines_paired(w, bias, dw, db)
            and kernels.buffers_ok(rm, rv, counts)
        ):
            return None
        if self.split_stats or dw is not None:  # (_needs_domain, from the dictionary's dw)
            if domain is None:
                domain = self.context_domain
            if type(domain) is int:
                if not 0 <= domain < self.num_domains:
                    return None
            elif not (
                type(domain) is Tensor
                and domain.dtype == torch.long
                and domain.device.type == "cpu"
            ):
                return None
        else:
            domain = 0
        index, dom = (domain, 0) if isinstance(domain, Tensor) else (None, domain)
        groups, row, momentum = self._kernel_rows(domain)
        try:
            out: Tensor = kernels.op("core_train")(
                x, w, bias, dw, db, index, dom, groups, self.eps, rm, rv, counts, row, momentum
            )
        except RuntimeError:
            if index is not None:
                check_index(type(self).__name__, index, self.num_domains, x.shape[0], x.device)
            raise
        return out

    def _fast(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor | None:
        """The fused training forward that applies to ``x``, or None (then the reference path
        runs): the moment-based closed-form function for large contiguous inputs and for
        per-sample split statistics; ATen's batch norm for other whole-batch statistics; for
        ``(N, C)`` inputs with per-sample split statistics the moment-based function with a
        generic fold (large inputs only)."""
        if x.numel() == 0:
            return None
        # normkit's compiled kernel, when enabled: one call each way at every size.
        if kernels.applies(x) and self._takes_kernel(params):
            return self._kernel_forward(x, domain, params)
        per_sample = self.split_stats and not isinstance(domain, int)
        large = x.numel() >= _fused.MOMENT_PATH_MIN_NUMEL
        # Small whole-batch inputs: ATen's batch norm is two operator calls, where the
        # closed-form function's dozens of small ones cost more than its faster passes save.
        if x.dim() > 2 and (per_sample or (large and x.is_contiguous())):
            return self._fast_norm_affine(x, domain, params)
        if per_sample and isinstance(domain, Tensor):  # (N, C) inputs
            return self._fast_split_forward(x, domain, params) if large else None
        return self._fast_forward(x, domain, params)

    def _fast_norm_affine(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """Contiguous input: statistics from per-(sample, channel) moments (of the whole batch,
        or per domain with per-sample split statistics), the folded affine in one pass, and a
        closed-form backward (:func:`normkit._fused.norm_affine`)."""
        weight, bias = self._combined_affine(domain, *params)
        pdtype = F.stats_dtype(x.dtype)
        w = None if weight is None else weight.to(pdtype)
        b = None if bias is None else bias.to(pdtype)
        if self.split_stats and not isinstance(domain, int):
            y, mean, var, count = norm_affine(x, w, b, self.eps, domain, self.num_domains)
            if self._tracking():
                spatial = x.numel() // (x.shape[0] * x.shape[1])
                self._update_running(mean, var, count * spatial)
            return y
        y, mean, var, _ = norm_affine(x, w, b, self.eps)
        self._track_whole_batch(mean, var, domain, x)
        return y

    def _takes_kernel(self, params: tuple[Tensor | None, ...]) -> bool:
        """Whether the compiled kernel computes this layer's training forward with these
        parameters (:meth:`_affines`): the core's folded affine in whole (scale, shift) pairs,
        with running buffers all present and contiguous or all absent (anything else keeps the
        PyTorch path's behaviour, errors included)."""
        b = self._buffers
        return kernels.affines_paired(*params[:4]) and kernels.buffers_ok(
            b.get("running_mean"), b.get("running_var"), b.get("num_batches_tracked")
        )

    def _kernel_forward(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """:meth:`_fast_norm_affine` as one call of the compiled kernel each way
        (:func:`normkit._fused.core_kernel`), the affines passed as they are."""
        w, b, dw, db = kernels.in_dtype(x.dtype, *params)
        groups, row, momentum = self._kernel_rows(domain)
        # (_takes_kernel: the three buffers are all present or all absent)
        rm, rv, counts = self.running_mean, self.running_var, self.num_batches_tracked
        running = None
        other_dtype = False
        if self._tracking() and rm is not None and rv is not None and counts is not None:
            # The kernel updates the buffers in the same call when they share the input's
            # dtype; others take the PyTorch update below.
            other_dtype = not kernels.in_dtype_already(x.dtype, rm, rv)
            if not other_dtype:
                running = (rm, rv, counts, row, momentum)
        y, mean, var, count = core_kernel(x, w, b, dw, db, domain, groups, self.eps, running)
        if other_dtype:
            if groups:  # per-sample split statistics
                spatial = x.numel() // (x.shape[0] * x.shape[1])
                self._update_running(mean, var, count * spatial)
            else:
                self._track_whole_batch(mean[0], var[0], domain, x)
        return y

    def _kernel_rows(self, domain: DomainIndex) -> tuple[int, int, float]:
        """``(groups, row, momentum)`` of a kernel call: the number of statistics groups (the
        domains, for a per-sample index with split statistics; 0 for the whole batch), the
        buffer row an int domain's split statistics go to (-1: the statistics' own rows), and
        the momentum (-1 for the cumulative average)."""
        groups, row = 0, -1
        if self.split_stats:
            if isinstance(domain, Tensor):
                groups = self.num_domains
            else:
                row = domain
        momentum = -1.0 if self.momentum is None else self.momentum
        return groups, row, momentum

    def _affines(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(weight, bias, domain_weight, domain_bias)``, None for the parts that do not exist."""
        if self.affine:
            return self.weight, self.bias, self.domain_weight, self.domain_bias
        return None, None, self.domain_weight, self.domain_bias

    @staticmethod
    def _combined_affine(
        domain: DomainIndex,
        weight: Tensor | None,
        bias: Tensor | None,
        domain_weight: Tensor | None,
        domain_bias: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The shared affine followed by the domain's: ``(C,)`` for an int domain or no domain
        affine, ``(N, C)`` per sample; ``(None, None)`` when there is no affine at all."""
        if domain_weight is None or domain_bias is None:
            return weight, bias
        if isinstance(domain, int):
            g, b = domain_weight[domain], domain_bias[domain]
        else:
            g, b = domain_weight.index_select(0, domain), domain_bias.index_select(0, domain)
        if weight is None or bias is None:
            return g, b
        return weight * g, bias * g + b

    def _fold(
        self, mean: Tensor, var: Tensor, domain: DomainIndex, *params: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Normalization and both affines as one scale and shift, ``(C,)`` or ``(N, C)``."""
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        w, b = self._combined_affine(domain, *params)
        if w is not None and b is not None:
            scale, shift = scale * w, shift * w + b
        scale, shift = torch.broadcast_tensors(scale, shift)
        return scale, shift

    def _fold_split(
        self, m: Tensor, q: Tensor, domain: Tensor, *params: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_fold` with per-domain statistics as functions of the per-sample moments."""
        dmean, dvar, _ = F.domain_moments(m, q, domain, self.num_domains)
        mean, var = dmean.index_select(0, domain), dvar.index_select(0, domain)
        return self._fold(mean, var, domain, *params)

    def _fast_forward(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """Batch statistics of the whole (local) batch and the folded affine, in fused kernels.

        Equal to the reference path (tested to 1e-10 in float64, forward and backward); used in
        eager training when the statistics are the whole batch's: shared statistics, or split
        statistics with one domain for the batch, and no synchronization.
        """
        weight, bias = self._combined_affine(domain, *params)
        y, mean, var = batch_norm_train(x, weight, bias, self.eps)
        self._track_whole_batch(mean, var, domain, x)
        return y

    def _fast_moment_forward(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """As :meth:`_fast_forward`, through per-(sample, channel) moments: on a contiguous CPU
        input, plain sums and one pass per (sample, channel) plane beat ATen's batch norm,
        whose per-channel Welford loop is slow."""
        m, q = sample_moments(x)
        mean, var = F.merge_sample_moments(m, q)
        self._track_whole_batch(mean, var, domain, x)
        return moment_scale_shift(x, m, q, self._fold_whole, domain, *params)

    def _fold_whole(
        self, m: Tensor, q: Tensor, domain: DomainIndex, *params: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_fold` with the batch statistics as functions of the per-sample moments."""
        mean, var = F.merge_sample_moments(m, q)
        return self._fold(mean, var, domain, *params)

    def _track_whole_batch(self, mean: Tensor, var: Tensor, domain: DomainIndex, x: Tensor) -> None:
        """Running-statistics update from the whole batch's moments (shared statistics, or one
        domain's split statistics)."""
        if not self._tracking():
            return
        count = x.numel() // x.shape[1]
        if self.split_stats:
            assert isinstance(domain, int)
            counts = torch.zeros(self.num_domains, dtype=mean.dtype, device=x.device)
            counts[domain] = count
            self._update_running(mean.expand(self.num_domains, -1), var, counts)
        else:
            self._update_running(mean, var, count)

    def _fast_split_forward(
        self, x: Tensor, domain: Tensor, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """Per-domain statistics from per-sample moments, and one fused scale-and-shift whose
        backward differentiates through the moments (:func:`normkit._fused.moment_scale_shift`).
        """
        m, q = sample_moments(x)
        if self._tracking():
            dmean, dvar, dcount = F.domain_moments(m, q, domain, self.num_domains)
            spatial = x.numel() // (x.shape[0] * x.shape[1])
            self._update_running(dmean, dvar, dcount * spatial)
        return moment_scale_shift(x, m, q, self._fold_split, domain, *params)

    def _shared_statistics(
        self, x: Tensor, use_batch: bool, syncing: bool
    ) -> tuple[Tensor, Tensor]:
        if not use_batch:
            assert self.running_mean is not None and self.running_var is not None
            # Copies, so that a later training forward's in-place update cannot invalidate
            # this forward's graph.
            return self.running_mean.clone(), self.running_var.clone()
        mean, var = F.batch_moments(x)
        count: int | Tensor = x.numel() // x.shape[1]
        if syncing:
            name = type(self).__name__
            mean, var, count = sync_moments(mean, var, count, self.process_group, name)
        if self._tracking():
            self._update_running(mean, var, count)
        return mean, var

    def _split_statistics(
        self, x: Tensor, domain: DomainIndex, use_batch: bool, syncing: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-domain statistics: ``(C,)`` for an int domain, ``(N, C)`` per sample otherwise."""
        track = self._tracking()
        if not use_batch:
            assert self.running_mean is not None and self.running_var is not None
            if isinstance(domain, int):
                return self.running_mean[domain].clone(), self.running_var[domain].clone()
            return (
                self.running_mean.index_select(0, domain),
                self.running_var.index_select(0, domain),
            )
        spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
        if isinstance(domain, int) and not syncing:
            mean, var = F.batch_moments(x)
            if track:
                count = torch.zeros(self.num_domains, dtype=mean.dtype, device=x.device)
                count[domain] = x.shape[0] * spatial
                self._update_running(mean.expand(self.num_domains, -1), var, count)
            return mean, var
        if isinstance(domain, int):
            # Other ranks may hold other domains: merge per domain.
            domain = torch.full((x.shape[0],), domain, dtype=torch.long, device=x.device)
        m, q = F.sample_moments(x)
        dmean, dvar, dcount = F.domain_moments(m, q, domain, self.num_domains)
        values: Tensor = dcount * spatial
        if syncing:
            dmean, dvar, values = sync_moments(
                dmean, dvar, values.unsqueeze(1), self.process_group, type(self).__name__
            )
        if track:
            self._update_running(dmean, dvar, values)
        return dmean.index_select(0, domain), dvar.index_select(0, domain)

    def _tracking(self) -> bool:
        # (Synchronized._tracking, and the buffers: a layer built without them has none.)
        return super()._tracking() and self.running_mean is not None

    def _update_running(self, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        track_batch_(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.momentum,
            mean,
            var,
            count,
        )


class SyncBatchNorm(_BatchNormCore):
    r"""Batch normalization whose training statistics span every rank of ``torch.distributed``.

    .. math::
        y = γ ⊙ (x − μ) / \sqrt{σ^2 + ε} + β

    with μ and the biased σ² taken over the samples of *all* ranks of ``process_group`` in
    training (one differentiable all-reduce per forward, on any backend, gloo on CPU included;
    uneven and empty per-rank batches are weighted by their sizes), and the running statistics in
    eval. Running statistics follow ``nn.BatchNorm``
    (``running = (1 − momentum) · running + momentum · stat``, unbiased variance stored) and are
    equal on every rank. Without an initialized process group of more than one rank it is a
    plain batch norm. Names and checkpoints are ``nn.BatchNorm``'s.

    :func:`normkit.convert_sync` swaps torch's batch norms for this layer (torch's own
    ``nn.SyncBatchNorm`` runs only on accelerators); :func:`normkit.revert_sync` swaps back.

    Shapes: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.

    Example::

        >>> norm = normkit.SyncBatchNorm(64)
        >>> norm(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8, 64, 4, 4])
    """

    _ranks = (2, 3, 4, 5)
    _shows_split = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            1,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            domain_affine=False,
            domain_std=0.0,
        )
        self.sync = True
        self.process_group = process_group

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, input: Tensor, domain: DomainIndex | None = None) -> Tensor:
        return super().forward(input)
