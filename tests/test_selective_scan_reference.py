"""The parallel selective-scan reference against the per-token fp64 oracle: outputs, last states
and every gradient; the one-token state update; stability; dtypes; dispatch."""

import re
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from kernels.selective_scan import selective_scan, selective_state_update
from kernels.selective_scan.reference import selective_scan_naive, selective_scan_ref
from tests.conftest import (
    ScanDims, assert_large_decays_finite_and_accurate, assert_low_precision_inputs_close_to_oracle,
    assert_matches_oracle, rel_err,
)


@dataclass(frozen=True)
class Case(ScanDims):
    z: bool = False
    D: bool = False
    bias: bool = False
    softplus: bool = False

    def __str__(self):
        flags = [name for name in ("z", "D", "bias", "softplus") if getattr(self, name)]
        return "-".join([self.dims(), *flags])


def make_inputs(case: Case, dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    """Leaf tensors that require grad; Δ stays small enough that states carry over many tokens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    b, d, l, n = case.b, case.d, case.l, case.n
    t = dict(
        u=randn(b, d, l),
        # softplus(−2 + noise) ≈ 0.13: raw delta is then a pre-activation, otherwise already Δ itself.
        delta=randn(b, d, l) - 2 if case.softplus else uniform(0.01, 0.3, b, d, l),
        A=-uniform(0.1, 2.0, d, n),
        B=randn(*case.bc_shape),
        C=randn(*case.bc_shape),
    )
    if case.D:
        t["D"] = randn(d)
    if case.z:
        t["z"] = randn(b, d, l)
    if case.bias:
        t["delta_bias"] = 0.5 * randn(d) if case.softplus else uniform(0.0, 0.05, d)
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def run_both(case: Case, inputs: dict):
    kwargs = dict(inputs, delta_softplus=case.softplus, return_last_state=True)
    return selective_scan_ref(**kwargs), selective_scan_naive(**kwargs)


CASES = [
    Case(2, 8, 300, 4, None, z=True, D=True, bias=True, softplus=True),
    Case(2, 6, 129, 8, 3, z=True, bias=True),
    Case(1, 4, 64, 16, None),
    Case(2, 8, 7, 4, 2, D=True, softplus=True),
    Case(3, 4, 1, 4, 4, z=True, D=True, bias=True, softplus=True),
    Case(2, 4, 2, 3, 1, D=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ref_matches_naive_outputs_and_all_gradients(case):
    inputs = make_inputs(case)
    # From h = 0, one token never sees the decay: A's gradient is zero at l = 1.
    assert_matches_oracle(*run_both(case, inputs), inputs, 1e-12, 1e-10, zero_grads=("A",) if case.l == 1 else ())


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_ref_fp32_is_close_to_fp64_oracle(case):
    inputs = make_inputs(case)
    _, (y_naive, last_naive) = run_both(case, inputs)
    inputs32 = {k: v.detach().float() for k, v in inputs.items()}
    y, last = selective_scan_ref(delta_softplus=case.softplus, return_last_state=True, **inputs32)
    assert y.dtype == last.dtype == torch.float32
    assert rel_err(y, y_naive) < 1e-5
    assert rel_err(last, last_naive) < 1e-5


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=str)
def test_state_update_step_by_step_equals_scan(case):
    t = {k: v.detach().float() for k, v in make_inputs(case).items()}
    y, last = selective_scan(delta_softplus=case.softplus, return_last_state=True, **t)
    state = torch.zeros(case.b, case.d, case.n)
    ys = []
    for i in range(case.l):
        ys.append(
            selective_state_update(
                state, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i], t["C"][..., i],
                D=t.get("D"), z=None if "z" not in t else t["z"][..., i], dt_bias=t.get("delta_bias"),
                dt_softplus=case.softplus,
            )
        )
    assert rel_err(torch.stack(ys, dim=-1), y) < 1e-5
    assert rel_err(state, last) < 1e-5  # updated in place


@pytest.mark.parametrize("softplus", [False, True], ids=["delta", "softplus"])
def test_long_sequence_large_delta_is_finite_and_accurate(softplus):
    """Δ up to ~10 with A down to −16: decays of exp(−160) per token, far below fp32's range."""
    b, d, l, n = 1, 8, 2048, 8
    assert_large_decays_finite_and_accurate(
        lambda *t: selective_scan_ref(*t, delta_softplus=softplus, return_last_state=True),
        lambda *t: selective_scan_naive(*t, delta_softplus=softplus),
        x_shape=(b, d, l), dt_shape=(b, d, l), A_shape=(d, n), BC_shape=(b, n, l),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_input_dtypes(dtype):
    """Low-precision inputs (A, D, delta_bias kept fp32 as the models keep them): y in u's dtype,
    last state fp32, close to the fp64 oracle run on the same rounded inputs."""
    case = Case(2, 8, 70, 4, 2, z=True, D=True, bias=True, softplus=True)
    assert_low_precision_inputs_close_to_oracle(
        lambda **t: selective_scan(delta_softplus=True, **t),
        lambda **t: selective_scan_naive(delta_softplus=True, **t),
        make_inputs(case), ("u", "delta", "B", "C", "z"), dtype, return_state="return_last_state",
    )


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["bwd-outside", "bwd-inside"])
def test_bf16_autocast_forward_and_backward(backward_in_autocast):
    """Under bf16 autocast (the LM's training step) the scan still computes in fp32: outputs and
    every gradient equal those of the same call without autocast, each gradient in its input's dtype.
    Autocast used to run the scan's matmuls in bf16 and the backward then failed on bf16 dy @ fp32 h."""
    case = Case(2, 8, 70, 4, None, z=True, D=True, bias=True, softplus=True)
    t = {k: v.detach() for k, v in make_inputs(case).items()}
    # As the Mamba block passes them under autocast: activations bf16, parameters fp32.
    t = {k: v.to(torch.bfloat16 if k in ("u", "delta", "B", "C", "z") else torch.float32) for k, v in t.items()}
    names = list(t)
    dy = torch.randn(case.b, case.d, case.l, generator=torch.Generator().manual_seed(1)).bfloat16()

    def run(autocast: bool):
        leaves = [t[k].clone().requires_grad_() for k in names]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = selective_scan(*leaves[:5], **dict(zip(names[5:], leaves[5:])), delta_softplus=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and backward_in_autocast):
            grads = torch.autograd.grad(y, leaves, dy)
        return y, grads

    (y, grads), (y_plain, grads_plain) = run(True), run(False)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_plain) < 1e-6
    for name, grad, grad_plain in zip(names, grads, grads_plain):
        assert grad.dtype == t[name].dtype and grad.isfinite().all(), name
        assert rel_err(grad, grad_plain) < 1e-6, name


def tiny_inputs():
    return {k: v.detach().float() for k, v in make_inputs(Case(1, 4, 8, 4, None)).items()}


def tiny_token(t):
    return dict(x=t["u"][..., 0], dt=t["delta"][..., 0], A=t["A"], B=t["B"][..., 0], C=t["C"][..., 0])


def test_unknown_backend_is_an_error():
    t = tiny_inputs()
    message = re.escape("backend='foo': must be one of 'auto', 'torch', 'triton'")
    with pytest.raises(ValueError, match=message):
        selective_scan(backend="foo", **t)
    with pytest.raises(ValueError, match=message):
        selective_state_update(torch.zeros(1, 4, 4), **tiny_token(t), backend="foo")


def test_groups_must_divide_dim():
    t = tiny_inputs()
    t["B"] = t["C"] = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"^ngroups=3: must divide dim=4$"):
        selective_scan(**t)


def test_auto_on_cpu_uses_torch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton backend was called")

    poisoned = types.SimpleNamespace(selective_scan_triton=fail, selective_state_update_triton=fail)
    monkeypatch.setitem(sys.modules, "kernels.selective_scan.triton", poisoned)
    t = tiny_inputs()
    assert torch.equal(selective_scan(**t), selective_scan_ref(**t))
    selective_state_update(torch.zeros(1, 4, 4), **tiny_token(t))


def test_triton_backend_gets_every_argument(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        selective_scan_triton=lambda *args, **kwargs: calls.append((args, kwargs)),
        selective_state_update_triton=lambda *args, **kwargs: calls.append((args, kwargs)),
    )
    monkeypatch.setitem(sys.modules, "kernels.selective_scan.triton", fake)
    t = tiny_inputs()
    selective_scan(backend="triton", delta_softplus=True, return_last_state=True, **t)
    selective_state_update(
        "state", "x", "dt", "A", "B", "C", D="D", z="z", dt_bias="bias", dt_softplus=True, backend="triton"
    )
    (scan_args, scan_kwargs), (update_args, update_kwargs) = calls
    assert scan_args == (t["u"], t["delta"], t["A"], t["B"], t["C"])
    assert scan_kwargs == dict(D=None, z=None, delta_bias=None, delta_softplus=True, return_last_state=True)
    assert update_args == ("state", "x", "dt", "A", "B", "C")
    assert update_kwargs == dict(D="D", z="z", dt_bias="bias", dt_softplus=True)
