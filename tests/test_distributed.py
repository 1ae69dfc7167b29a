"""convert_sync: two gloo processes, each with part of a batch, equal one process with all of it.

Each case builds a layer, converts it with ``convert_sync``, and runs one training forward and
backward (plus a second forward, so running statistics are compared after two updates) on
``world_size`` CPU processes that split the batch (unevenly, and with one rank empty). The parent
process runs the unconverted layer on the whole batch and compares outputs, input gradients,
parameter gradients (summed over ranks, as DDP would before averaging) and running buffers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normkit as nk
from tests.gloo import init_gloo, run_ranks

WORLD = 2
F64 = torch.float64

Factory = Callable[[], nn.Module]

# name -> (factory, input shape of the whole batch, domain: None, an int, "per_sample" (a tensor
# over DOMAINS), "per_rank" (each rank passes its own int, RANK_DOMAINS[rank]) or "mixed" (rank 0
# a per-sample tensor, rank 1 an int)); the single-process reference gets each row's domain.
CASES: dict[str, tuple[Factory, tuple[int, ...], Any]] = {
    "torch-bn2d": (lambda: nn.BatchNorm2d(4, dtype=F64), (6, 4, 3, 3), None),
    "torch-bn1d": (lambda: nn.BatchNorm1d(4, dtype=F64), (6, 4), None),
    "sabn-shared": (lambda: nk.SandwichBatchNorm2d(4, 3, dtype=F64), (6, 4, 3, 3), "per_sample"),
    "sabn-split": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True, dtype=F64),
        (6, 4, 3, 3),
        "per_sample",
    ),
    "sabn-split-int": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True, dtype=F64),
        (6, 4, 3, 3),
        1,
    ),
    "ccbn": (
        lambda: nk.CategoricalConditionalBatchNorm2d(4, 3, momentum=None, dtype=F64),
        (6, 4, 3, 3),
        "per_sample",
    ),
    "auxbn": (lambda: nk.AuxBatchNorm2d(4, 3, dtype=F64), (6, 4, 3, 3), "per_sample"),
    # Ranks holding different domains: the per-domain statistics merge over ranks.
    "sabn-split-per-rank-int": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True, dtype=F64),
        (6, 4, 3, 3),
        "per_rank",
    ),
    "auxbn-per-rank-int": (lambda: nk.AuxBatchNorm2d(4, 3, dtype=F64), (6, 4, 3, 3), "per_rank"),
    "sabn-split-mixed": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True, momentum=None, dtype=F64),
        (6, 4, 3, 3),
        "mixed",
    ),
    "bcn": (lambda: nk.BatchChannelNorm2d(4, 2, dtype=F64), (6, 4, 3, 3), None),
    "bcn-micro": (
        lambda: nk.BatchChannelNorm2d(4, 2, estimate=True, estimate_rate=0.3, dtype=F64),
        (6, 4, 3, 3),
        None,
    ),
    "inputnorm": (lambda: nk.InputNorm2d(4, dtype=F64), (6, 4, 3, 3), None),
    # Related methods (issue 8), one block per family; each helper edits only its own block.
    # -- renorm / batch-group cases --
    # Limits at their targets from the first step: r and d come from the merged statistics
    # (d clipped at 0.75 against the initial running mean 0, r mostly not).
    "brn-relaxed": (
        lambda: nk.BatchRenorm2d(
            4, r_max=2.5, d_max=0.75, warmup_steps=0, r_max_steps=0, d_max_steps=0, dtype=F64
        ),
        (6, 4, 3, 3),
        None,
    ),
    "bgn": (lambda: nk.BatchGroupNorm2d(4, 2, dtype=F64), (6, 4, 3, 3), None),
    # -- mabn cases --
    # Ring rows of 1 and no warm-up: the second step normalizes by the ring's average, and r
    # (clamped from the first step) reads the running variance that the first step moved.
    "mabn": (
        lambda: nk.MovingAverageBatchNorm2d(
            4, momentum=0.3, buffer_size=1, warmup_iters=0, r_clamp_steps=0, dtype=F64
        ),
        (6, 4, 3, 3),
        None,
    ),
    # -- iternorm / bnet cases --
    # Whitening matrices from the merged covariance: the same on every rank.
    "iternorm": (lambda: nk.IterNorm2d(4, group_size=2, dtype=F64), (6, 4, 3, 3), None),
    "iternorm1d-flat-cumulative": (
        lambda: nk.IterNorm1d(4, momentum=None, dtype=F64),
        (6, 4),
        None,
    ),
    "bnet": (lambda: nk.BNET2d(4, kernel_size=3, dtype=F64), (6, 4, 3, 3), None),
    # -- evonorm cases --
    "evonorm-b0": (lambda: nk.EvoNormB0(4, dtype=F64), (6, 4, 3, 3), None),
    "evonorm-b0-cumulative": (
        lambda: nk.EvoNormB0(4, momentum=None, dtype=F64),
        (6, 4, 3, 3),
        None,
    ),
}
DOMAINS = [0, 1, 2, 2, 0, 1]
RANK_DOMAINS = [0, 2]
# Rows of the whole batch held by each rank: uneven, and one split with an empty rank.
SPLITS = {"uneven": [[0, 1, 2, 3], [4, 5]], "empty-rank": [[0, 1, 2, 3, 4, 5], []]}


def _randomize(layer: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _data(name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    _, shape, _ = CASES[name]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g, dtype=F64) * 2 + 1 for _ in range(2)]
    weight = torch.randn(shape, generator=g, dtype=F64)
    return xs, weight


def _domain(name: str, rows: list[int], split: str, rank: int | None) -> Any:
    """The domain argument of ``rank`` (None: the single-process reference with every row)."""
    kind = CASES[name][2]
    if kind is None:
        return None
    if kind in ("per_rank", "mixed"):
        if rank is None:  # each row gets the domain its rank gives it
            owner = {row: r for r, held in enumerate(SPLITS[split]) for row in held}
            per_sample = kind == "mixed"
            return torch.tensor(
                [
                    DOMAINS[row] if per_sample and owner[row] == 0 else RANK_DOMAINS[owner[row]]
                    for row in rows
                ],
                dtype=torch.long,
            )
        if kind == "per_rank" or rank == 1:
            return RANK_DOMAINS[rank]
        kind = "per_sample"
    if kind == "per_sample":
        return torch.tensor([DOMAINS[r] for r in rows], dtype=torch.long)
    return kind


def _run(
    layer: nn.Module, name: str, rows: list[int], split: str, rank: int | None
) -> dict[str, Any]:
    """Two training steps on ``rows`` of the data; the first step's output and gradients."""
    xs, weight = _data(name)
    x = xs[0][rows].clone().requires_grad_()
    domain = _domain(name, rows, split, rank)
    args = (x,) if domain is None else (x, domain)
    out = layer(*args)
    (out * weight[rows]).sum().backward()
    second = xs[1][rows]
    layer(*((second,) if domain is None else (second, domain)))
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "param_grads": {
            n: (p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in layer.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in layer.named_buffers()},
    }


def _worker(rank: int, store_path: str, out_dir: str, split: str) -> None:
    init_gloo(rank, store_path, WORLD, timeout_s=60)
    try:
        results = {}
        for name, (factory, _, _) in CASES.items():
            torch.manual_seed(0)
            layer = factory()
            _randomize(layer)
            layer = nk.convert_sync(layer)
            results[name] = _run(layer, name, SPLITS[split][rank], split, rank)
        results["ddp"] = _ddp_step(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nk.BatchChannelNorm2d(8, 4, estimate=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _ddp_step(rank: int) -> dict[str, torch.Tensor]:
    model = nk.convert_sync(_ddp_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    rows = slice(0, 4) if rank == 0 else slice(4, 8)
    loss = nn.functional.cross_entropy(ddp(x[rows]), y[rows])
    loss.backward()
    opt.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(SPLITS))
def rank_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[dict[str, Any]]]:
    split = request.param
    return split, run_ranks(_worker, WORLD, tmp_path_factory.mktemp(f"dist-{split}"), split)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_with_the_whole_batch(
    name: str, rank_results: tuple[str, list[dict[str, Any]]]
) -> None:
    split, results = rank_results
    factory = CASES[name][0]
    torch.manual_seed(0)
    layer = factory()
    _randomize(layer)
    whole = _run(layer, name, list(range(CASES[name][1][0])), split, None)
    rows = SPLITS[split]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for rank in range(WORLD):
        got = results[rank][name]
        torch.testing.assert_close(got["out"], whole["out"][rows[rank]], **tol)
        torch.testing.assert_close(got["x_grad"], whole["x_grad"][rows[rank]], **tol)
        for key, buf in whole["buffers"].items():
            torch.testing.assert_close(got["buffers"][key], buf, **tol, msg=f"{name}: {key}")
    for key, grad in whole["param_grads"].items():
        summed = sum(results[rank][name]["param_grads"][key] for rank in range(WORLD))
        torch.testing.assert_close(summed, grad, **tol, msg=f"{name}: grad of {key}")


def test_ddp_training_step_keeps_ranks_in_step(
    rank_results: tuple[str, list[dict[str, Any]]],
) -> None:
    _, results = rank_results
    a, b = results[0]["ddp"], results[1]["ddp"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    # The step changed the model, and the synchronized BN statistics moved.
    fresh = _ddp_model().state_dict()
    assert not torch.equal(a["1.running_mean"], fresh["1.running_mean"])
    assert not torch.equal(a["0.weight"], fresh["0.weight"])


def test_convert_sync_keeps_parameters_and_reverts() -> None:
    model = _ddp_model()
    bn = model[1]
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = nk.convert_sync(model)
    assert isinstance(converted[1], nk.SyncBatchNorm) and converted[4].sync
    assert converted[1].weight is bn.weight and converted[1].running_mean is bn.running_mean
    assert {n: p for n, p in converted.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in converted.named_parameters())
    x = torch.randn(4, 3, 6, 6)
    # Without a process group the converted model computes what the original did.
    reference = copy.deepcopy(_ddp_model())
    torch.testing.assert_close(converted(x), reference(x))
    converted(x).sum().backward()
    opt.step()
    reverted = nk.revert_sync(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and not reverted[4].sync
    assert reverted[1].weight is bn.weight
    assert reverted.state_dict().keys() == reference.state_dict().keys()


def test_convert_sync_refuses_unknown_batchnorm_subclasses() -> None:
    class BNAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BNAct(4))
    with pytest.raises(TypeError, match=r"convert_sync: .*BNAct at '1'.*treat_as_bn"):
        nk.convert_sync(model)
    converted = nk.convert_sync(model, treat_as_bn=(BNAct,))
    assert isinstance(converted[1], nk.SyncBatchNorm)
    root = nk.convert_sync(nn.BatchNorm1d(3))
    assert isinstance(root, nk.SyncBatchNorm)
    assert type(nk.revert_sync(root)) is nn.BatchNorm1d


def test_convert_sync_leaves_frozen_norms_alone() -> None:
    model = nk.freeze_norm(_ddp_model())
    converted = nk.convert_sync(model)
    assert type(converted[1]).__name__ == "FrozenBatchNorm2d" and not converted[4].sync


# -- double backward, multi-scale micro-batches, activation checkpointing --------------------------

# Layers whose gradient a gradient penalty differentiates again (double backward) through the
# synchronized statistics (the all-reduce's backward is itself differentiable).
GP_CASES = ["torch-bn2d", "sabn-split", "bcn", "bgn", "iternorm"]
# BCN's micro-batch mode on ranks with different spatial sizes (multi-scale training).
MULTI_SCALE = [(2, 4, 2, 2), (3, 4, 4, 4)]
CKPT_CASES = ["bcn-micro", "brn-relaxed", "mabn"]


def _gradient_penalty(layer: nn.Module, name: str, rows: list[int], rank: int | None) -> Any:
    """``‖∂L/∂x‖²`` of this rank's rows (the gradient of the loss of every rank, as DDP sees
    it), its gradients; the single-process reference gets every row."""
    xs, weight = _data(name)
    x = xs[0][rows].clone().requires_grad_()
    domain = _domain(name, rows, "uneven", rank)
    out = layer(x) if domain is None else layer(x, domain)
    (gx,) = torch.autograd.grad((out * weight[rows]).square().sum(), x, create_graph=True)
    penalty = gx.square().sum()
    penalty.backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return {"penalty": penalty.detach(), "x_grad": x.grad, "param_grads": grads}


def _multi_scale(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(MULTI_SCALE[rank], generator=g, dtype=F64) * (1 + rank) + 3 * rank


def _bcn_multi_scale() -> nn.Module:
    layer = nk.BatchChannelNorm2d(4, 2, estimate=True, estimate_rate=0.4, dtype=F64)
    _randomize(layer)
    return layer


def _checkpointed(layer: nn.Module, name: str, rows: list[int], reentrant: bool) -> Any:
    """Two training steps, the first through torch.utils.checkpoint; as :func:`_run`."""
    from torch.utils.checkpoint import checkpoint

    xs, weight = _data(name)
    x = xs[0][rows].clone().requires_grad_()
    out = checkpoint(layer, x, use_reentrant=reentrant)
    (out * weight[rows]).sum().backward()
    layer(xs[1][rows])
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "param_grads": {n: p.grad for n, p in layer.named_parameters()},
        "buffers": {n: b.clone() for n, b in layer.named_buffers()},
    }


def _extra_worker(rank: int, store_path: str, out_dir: str) -> None:
    init_gloo(rank, store_path, WORLD, timeout_s=60)
    try:
        rows = SPLITS["uneven"][rank]
        results: dict[str, Any] = {}
        for name in GP_CASES:
            torch.manual_seed(0)
            layer = CASES[name][0]()
            _randomize(layer)
            results[f"gp/{name}"] = _gradient_penalty(nk.convert_sync(layer), name, rows, rank)
        layer = nk.convert_sync(_bcn_multi_scale())
        x = _multi_scale(rank)
        results["multi-scale"] = {
            "out": layer(x).detach(),
            "buffers": {n: b.clone() for n, b in layer.named_buffers()},
        }
        import warnings

        warnings.simplefilter("ignore")  # reentrant mode's note on inputs without gradient
        for name in CKPT_CASES:
            for reentrant in (False, True):
                torch.manual_seed(0)
                layer = CASES[name][0]()
                _randomize(layer)
                layer = nk.convert_sync(layer)
                results[f"ckpt/{name}/{reentrant}"] = _checkpointed(layer, name, rows, reentrant)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def extra_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_extra_worker, WORLD, tmp_path_factory.mktemp("dist-extra"))


@pytest.mark.parametrize("name", GP_CASES)
def test_double_backward_through_synchronized_statistics(
    name: str, extra_results: list[dict[str, Any]]
) -> None:
    """A gradient penalty on two ranks equals one process with the whole batch: the
    second-order gradient reaches the other rank's statistics too."""
    torch.manual_seed(0)
    layer = CASES[name][0]()
    _randomize(layer)
    whole = _gradient_penalty(layer, name, list(range(CASES[name][1][0])), None)
    rows = SPLITS["uneven"]
    got = [extra_results[rank][f"gp/{name}"] for rank in range(WORLD)]
    tol = {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(sum(g["penalty"] for g in got), whole["penalty"], **tol)
    for rank in range(WORLD):
        torch.testing.assert_close(got[rank]["x_grad"], whole["x_grad"][rows[rank]], **tol)
    for key, grad in whole["param_grads"].items():
        summed = sum(g["param_grads"][key] for g in got)
        torch.testing.assert_close(summed, grad, **tol, msg=f"{name}: grad of {key}")


def test_micro_batch_estimates_weigh_ranks_by_values(extra_results: list[dict[str, Any]]) -> None:
    """BCN's estimates from ranks with different spatial sizes: the update a single process
    makes from every value of the batch (not from the mean of per-sample means)."""
    layer = _bcn_multi_scale()
    assert layer.running_mean is not None and layer.running_var is not None
    values = torch.cat([_multi_scale(r).transpose(0, 1).reshape(4, -1) for r in range(WORLD)], 1)
    old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
    mean = values.mean(1)
    var = (values - old_mean.unsqueeze(1)).square().mean(1)
    with torch.no_grad():
        layer.running_mean.copy_(torch.lerp(old_mean, mean, 0.4))
        layer.running_var.copy_(torch.lerp(old_var, var, 0.4))
    layer.eval()  # normalizes with the estimates, as training does after its update
    for rank in range(WORLD):
        got = extra_results[rank]["multi-scale"]
        torch.testing.assert_close(got["buffers"]["running_mean"], layer.running_mean)
        torch.testing.assert_close(got["buffers"]["running_var"], layer.running_var)
        assert int(got["buffers"]["num_batches_tracked"]) == 1
        torch.testing.assert_close(got["out"], layer(_multi_scale(rank)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", CKPT_CASES)
def test_checkpointed_ranks_equal_one_plain_process(
    name: str, reentrant: bool, extra_results: list[dict[str, Any]]
) -> None:
    """Layers whose output depends on state their forward updates, checkpointed on two ranks:
    the recomputation replays each rank's first forward (no update, no all-reduce of the
    update on any rank), so two steps equal one plain process with the whole batch."""
    torch.manual_seed(0)
    layer = CASES[name][0]()
    _randomize(layer)
    whole = _run(layer, name, list(range(CASES[name][1][0])), "uneven", None)
    rows = SPLITS["uneven"]
    tol = {"rtol": 1e-7, "atol": 1e-7}
    got = [extra_results[rank][f"ckpt/{name}/{reentrant}"] for rank in range(WORLD)]
    for rank in range(WORLD):
        torch.testing.assert_close(got[rank]["out"], whole["out"][rows[rank]], **tol)
        torch.testing.assert_close(got[rank]["x_grad"], whole["x_grad"][rows[rank]], **tol)
        for key, buf in whole["buffers"].items():
            torch.testing.assert_close(got[rank]["buffers"][key], buf, **tol, msg=key)
    for key, grad in whole["param_grads"].items():
        summed = sum(g["param_grads"][key] for g in got)
        torch.testing.assert_close(summed, grad, **tol, msg=f"{name}: grad of {key}")


def test_convert_sync_keeps_hooks_and_a_torch_sync_batchnorms_group() -> None:
    group = object()  # stands in for a process group: nothing collective runs without one
    bn = nn.SyncBatchNorm(4, process_group=group)
    calls: list[str] = []
    bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    bn.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    converted = nk.convert_sync(nn.Sequential(nn.Conv2d(3, 4, 1), bn))
    assert isinstance(converted[1], nk.SyncBatchNorm) and converted[1].process_group is group
    converted(torch.randn(2, 3, 3, 3, requires_grad=True)).sum().backward()
    assert calls == ["pre", "post", "backward"]
    reverted = nk.revert_sync(converted)
    assert type(reverted[1]) is nn.SyncBatchNorm and reverted[1].process_group is group
    calls.clear()
    reverted.eval()(torch.randn(2, 3, 3, 3))
    assert calls == ["pre", "post"]
    # An explicit group wins over the one the torch layer had.
    other = object()
    assert nk.convert_sync(nn.SyncBatchNorm(4, process_group=group), other).process_group is other
