"""ResidualGate (SkipInit / ReZero): ``x + α·f(x)`` with α initialised to 0.

Identities (related-methods §3.5): the block is the identity at init; the gate receives a
non-zero gradient at init (``⟨∂L/∂y, f(x)⟩``) while the branch's parameters receive none; the gate
scales the branch exactly. Then its shared rules with Fixup's ``Scale``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk

F64 = torch.float64


class Block(nn.Module):
    """A residual block without normalization: ``x + gate(f(x))``."""

    def __init__(self, channels: int = 4, init: float = 0.0) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.gate = nk.ResidualGate(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.gate(self.f(x))
        return out


def _x(shape: tuple[int, ...] = (3, 4, 5, 5), dtype: torch.dtype = torch.float32) -> Any:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)


def test_a_gated_block_is_the_identity_at_init() -> None:
    torch.manual_seed(0)
    block = Block()
    x = _x()
    assert torch.equal(block(x), x)
    deep = nn.Sequential(*[Block() for _ in range(8)])
    assert torch.equal(deep(x), x)


def test_at_init_the_gate_gets_a_gradient_and_the_branch_none() -> None:
    torch.manual_seed(0)
    block = Block().double()
    x = _x(dtype=F64)
    up = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    block(x).backward(up)
    with torch.no_grad():
        want = (up * block.f(x)).sum().reshape(1)
    grad = block.gate.weight.grad
    assert grad is not None and grad.abs().item() > 0
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
    for name, p in block.f.named_parameters():
        assert p.grad is not None and p.grad.count_nonzero() == 0, name
    # One SGD step moves the gate; from then on the branch learns.
    with torch.no_grad():
        block.gate.weight.sub_(0.01 * grad)
    block.zero_grad()
    block(x).backward(up)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.f.parameters())


@pytest.mark.parametrize("alpha", [0.0, 0.37, -1.5, 3.0])
def test_the_gate_scales_the_branch_exactly(alpha: float) -> None:
    torch.manual_seed(0)
    block = Block(init=alpha)
    x = _x()
    h = block.f(x)
    assert torch.equal(block.gate(h), h * torch.tensor(alpha))
    assert torch.equal(block(x), x + h * torch.tensor(alpha))


def test_matches_the_formula_in_float64_with_gradients() -> None:
    gate = nk.ResidualGate(0.3, dtype=F64)
    x = _x(dtype=F64).requires_grad_()
    up = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = gate(x)
    dx, dalpha = torch.autograd.grad(y, [x, gate.weight], up)
    alpha = gate.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    want = alpha * x_ref  # y = α·x, α one scalar
    want_dx, want_dalpha = torch.autograd.grad(want, [x_ref, alpha], up)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=0)
    torch.testing.assert_close(dalpha, want_dalpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dalpha, (up * x).sum().reshape(1), rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck_in_float64() -> None:
    x = _x((2, 3, 2), F64).requires_grad_()
    alpha = torch.tensor([0.7], dtype=F64, requires_grad=True)
    gate = nk.ResidualGate(dtype=F64)

    def f(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(gate, {"weight": a}, (x,))
        return out

    assert gradcheck(f, (x, alpha))
    assert gradgradcheck(f, (x, alpha))


def test_init_reset_and_the_fixup_and_param_group_rules() -> None:
    gate = nk.ResidualGate(0.25)
    assert gate.weight.shape == (1,) and gate.weight.item() == 0.25
    assert repr(gate) == "ResidualGate(init=0.25)"
    assert isinstance(gate, nk.Scale)
    with torch.no_grad():
        gate.weight.fill_(3.0)
    gate.reset_parameters()
    assert gate.weight.item() == 0.25
    # The Fixup tools select it by type, as a Scale: fixup_init_ resets it to its own init.
    with torch.no_grad():
        gate.weight.fill_(3.0)
    nk.fixup_init_(nn.Sequential(_FixupBlock(), gate))
    assert gate.weight.item() == 0.25
    groups = nk.fixup_param_groups(nn.Sequential(nn.Linear(2, 2), gate), lr=0.1)
    assert [g["name"] for g in groups] == ["default", "fixup_scalars"]
    assert groups[1]["params"] == [gate.weight]
    groups = nk.bn_param_groups(nn.Sequential(gate), 0.1, 1e-4)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("no_decay", 0.0)]


class _FixupBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)

    def fixup_branch_layers(self) -> list[nn.Module]:
        return [self.fc1, self.fc2]


def test_dtypes_state_dict_and_copies() -> None:
    gate = nk.ResidualGate(0.5)
    for dtype in (torch.float16, torch.bfloat16, F64):
        assert gate(_x(dtype=dtype)).dtype == dtype  # Scale's rule: the input's dtype
    assert nk.ResidualGate(dtype=torch.float16).weight.dtype == torch.float16
    assert list(gate.state_dict()) == ["weight"]
    other = nk.ResidualGate()
    other.load_state_dict(gate.state_dict(), strict=True)
    assert other.weight.item() == 0.5 and other.init == 0.0  # the init is configuration
    copied = copy.deepcopy(gate)
    assert copied.init == 0.5 and torch.equal(copied.weight, gate.weight)


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (lambda: nk.ResidualGate(float("nan")), ValueError, "finite init, got nan"),
        (lambda: nk.ResidualGate(float("inf")), ValueError, "finite init, got inf"),
        (lambda: nk.ResidualGate("0"), TypeError, "init to be a number, got '0'"),
        (lambda: nk.ResidualGate(True), TypeError, "init to be a number, got True"),
        (lambda: nk.ResidualGate(dtype=torch.long), TypeError, "floating-point torch.dtype"),
        (
            lambda: nk.ResidualGate()(torch.ones(2, dtype=torch.long)),
            TypeError,
            "floating-point input, got dtype torch.int64",
        ),
    ],
)
def test_bad_arguments_are_refused(make: Any, exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=r"^ResidualGate: expected") as info:
        make()
    assert fragment in str(info.value)
