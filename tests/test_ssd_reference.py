"""The chunked SSD reference against the per-token fp64 oracle: outputs, final states and every
gradient; chaining through initial states; the one-token step; stability; dtypes; dispatch."""

import re
import sys
import types

import pytest
import torch

import kernels.ssd
from kernels import load_backend
from kernels.ssd import ssd_scan, ssd_step
from kernels.ssd.reference import ssd_scan_naive, ssd_scan_ref
from tests.conftest import (
    SSDCase, assert_large_decays_finite_and_accurate, assert_low_precision_inputs_close_to_oracle,
    assert_matches_oracle, rel_err,
)


Case = SSDCase  # dtype left None: make_inputs takes the dtype


def make_inputs(case: Case, dtype=torch.float64, seed=0, dt_max=0.3) -> dict[str, torch.Tensor]:
    """Leaf tensors that require grad; Δ stays in (0, dt_max]-ish so that states carry over many tokens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    b, l, h, p, n, g = case.b, case.l, case.h, case.p, case.n, case.g
    t = dict(
        x=randn(b, l, h, p),
        # softplus(−2 + noise) ≈ 0.13: raw dt is then a pre-activation, otherwise already Δ itself.
        dt=randn(b, l, h) - 2 if case.softplus else uniform(0.01, dt_max, b, l, h),
        A=-uniform(0.1, 2.0, h),
        B=randn(b, l, g, n),
        C=randn(b, l, g, n),
    )
    if case.D:
        t["D"] = randn(h) if case.D == "h" else randn(h, p)
    if case.z:
        t["z"] = randn(b, l, h, p)
    if case.bias:
        t["dt_bias"] = 0.5 * randn(h) if case.softplus else uniform(0.0, 0.05, h)
    if case.h0:
        t["initial_states"] = randn(b, h, p, n)
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def run_both(case: Case, inputs: dict):
    kwargs = dict(inputs, dt_softplus=case.softplus, return_final_states=True)
    return ssd_scan_ref(chunk_size=case.Q, **kwargs), ssd_scan_naive(**kwargs)


CASES = [
    Case(2, 300, 4, 16, 8, 2, 64, z=True, D="h", bias=True, softplus=True, h0=True),
    Case(1, 64, 2, 8, 4, 1, 16),
    Case(2, 100, 6, 8, 16, 3, 32, z=True, bias=True),
    Case(2, 37, 4, 4, 8, 4, 8, D="hp", softplus=True, h0=True),
    Case(2, 5, 2, 4, 4, 1, 64, z=True, D="h", h0=True),
    Case(3, 1, 2, 4, 4, 2, 16, D="h", bias=True, softplus=True, h0=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ref_matches_naive_outputs_and_all_gradients(case):
    inputs = make_inputs(case)
    assert_matches_oracle(*run_both(case, inputs), inputs, 1e-12, 1e-10)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_ref_fp32_is_close_to_fp64_oracle(case):
    inputs = make_inputs(case)
    (_, _), (y_naive, final_naive) = run_both(case, inputs)
    inputs32 = {k: v.detach().float() for k, v in inputs.items()}
    y, final = ssd_scan_ref(chunk_size=case.Q, dt_softplus=case.softplus, return_final_states=True, **inputs32)
    assert y.dtype == final.dtype == torch.float32
    assert rel_err(y, y_naive) < 1e-5
    assert rel_err(final, final_naive) < 1e-5


@pytest.mark.parametrize("split", [77, 128, 1])
def test_initial_states_chain(split):
    case = Case(2, 200, 4, 8, 8, 2, 32, z=True, D="h", bias=True, softplus=True, h0=True)
    t = {k: v.detach() for k, v in make_inputs(case).items()}
    per_token = ("x", "dt", "B", "C", "z")
    fixed = dict(chunk_size=case.Q, dt_softplus=True, return_final_states=True)
    y, final = ssd_scan_ref(**t, **fixed)
    first = {k: (v[:, :split] if k in per_token else v) for k, v in t.items()}
    y1, mid = ssd_scan_ref(**first, **fixed)
    second = {k: (v[:, split:] if k in per_token else v) for k, v in t.items()} | {"initial_states": mid}
    y2, final2 = ssd_scan_ref(**second, **fixed)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-12
    assert rel_err(final2, final) < 1e-12


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_step_by_step_equals_scan(case):
    t = {k: v.detach().float() for k, v in make_inputs(case).items()}
    y, final = ssd_scan(chunk_size=case.Q, dt_softplus=case.softplus, return_final_states=True, **t)
    state = t.get("initial_states", torch.zeros(case.b, case.h, case.p, case.n)).clone()
    per_token = {k: t[k] for k in ("x", "dt", "B", "C", "z") if k in t}
    constant = {k: t[k] for k in ("A", "D", "dt_bias") if k in t}
    ys = []
    for i in range(case.l):
        token = {k: v[:, i] for k, v in per_token.items()}
        ys.append(ssd_step(state, **token, **constant, dt_softplus=case.softplus))
    assert rel_err(torch.stack(ys, dim=1), y) < 1e-5
    assert rel_err(state, final) < 1e-5  # updated in place


@pytest.mark.parametrize("softplus", [False, True], ids=["dt", "softplus"])
def test_long_sequence_large_dt_is_finite_and_accurate(softplus):
    """Δ up to ~10 with A down to −16: per-token log-decays of −160 and cumulative ones far below
    fp32's exp range, the case where a subtract-the-cumsum segment sum gives NaN."""
    b, l, h, p, n = 1, 2048, 4, 8, 8
    assert_large_decays_finite_and_accurate(
        lambda *t: ssd_scan_ref(*t, 64, dt_softplus=softplus, return_final_states=True),
        lambda *t: ssd_scan_naive(*t, dt_softplus=softplus),
        x_shape=(b, l, h, p), dt_shape=(b, l, h), A_shape=(h,), BC_shape=(b, l, 1, n),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_input_dtypes(dtype):
    """Low-precision inputs (A, D, dt_bias kept fp32 as the models keep them): y in x's dtype,
    states fp32, close to the fp64 oracle run on the same rounded inputs."""
    case = Case(2, 70, 4, 8, 8, 2, 32, z=True, D="h", bias=True, softplus=True, h0=True)
    assert_low_precision_inputs_close_to_oracle(
        lambda **t: ssd_scan(chunk_size=case.Q, dt_softplus=True, **t),
        lambda **t: ssd_scan_naive(dt_softplus=True, **t),
        make_inputs(case), ("x", "dt", "B", "C", "z"), dtype, return_state="return_final_states",
    )


def tiny_inputs():
    case = Case(1, 8, 2, 4, 4, 1, 4)
    return {k: v.detach().float() for k, v in make_inputs(case).items()}


def test_unknown_backend_is_an_error():
    t = tiny_inputs()
    message = re.escape("backend='foo': must be one of 'auto', 'torch', 'triton'")
    with pytest.raises(ValueError, match=message):
        ssd_scan(chunk_size=4, backend="foo", **t)
    state = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match=message):
        ssd_step(state, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], backend="foo")


def test_bad_sizes_are_errors():
    t = tiny_inputs()
    with pytest.raises(ValueError, match=r"^chunk_size=0: must be a positive integer$"):
        ssd_scan(chunk_size=0, **t)
    t["B"] = t["C"] = torch.randn(1, 8, 3, 4)
    with pytest.raises(ValueError, match=r"^ngroups=3: must divide nheads=2$"):
        ssd_scan(chunk_size=4, **t)


def _poisoned_triton_module():
    def fail(*args, **kwargs):
        raise AssertionError("the Triton backend was called")

    return types.SimpleNamespace(ssd_scan_triton=fail, ssd_step_triton=fail)


def test_auto_on_cpu_uses_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels.ssd.triton", _poisoned_triton_module())
    t = tiny_inputs()
    assert torch.equal(ssd_scan(chunk_size=4, **t), ssd_scan_ref(chunk_size=4, **t))
    state = torch.zeros(1, 2, 4, 4)
    ssd_step(state, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0])


def test_triton_backend_gets_every_argument(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        ssd_scan_triton=lambda *args, **kwargs: calls.append(("scan", args, kwargs)),
        ssd_step_triton=lambda *args, **kwargs: calls.append(("step", args, kwargs)),
    )
    monkeypatch.setitem(sys.modules, "kernels.ssd.triton", fake)
    t = tiny_inputs()
    ssd_scan(chunk_size=4, backend="triton", dt_softplus=True, return_final_states=True, **t)
    ssd_step("state", "x", "dt", "A", "B", "C", D="D", z="z", dt_bias="bias", dt_softplus=True, backend="triton")
    (_, scan_args, scan_kwargs), (_, step_args, step_kwargs) = calls
    assert scan_args == (t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    assert scan_kwargs == dict(
        D=None, z=None, dt_bias=None, dt_softplus=True, initial_states=None, return_final_states=True, path="auto"
    )
    assert step_args == ("state", "x", "dt", "A", "B", "C")
    assert step_kwargs == dict(D="D", z="z", dt_bias="bias", dt_softplus=True)


def test_auto_uses_the_reference_where_triton_cannot_take_the_state(monkeypatch):
    """backend="auto" asks the Triton module whether it takes the input (its kernels hold the state in shared
    memory) and otherwise warns and runs the reference; backend="triton" leaves the error to the module."""
    reason = "headdim=4, d_state=4 in torch.float32: too large"
    fake = _poisoned_triton_module()
    fake.unsupported = lambda x, dstate: reason if (x.shape[3], dstate) == (4, 4) else None
    monkeypatch.setattr(kernels.ssd, "load_backend", lambda module, backend, x: fake)  # as for CUDA tensors
    t = tiny_inputs()
    with pytest.warns(UserWarning, match=re.escape(f"{reason}; backend='auto' uses the PyTorch reference")):
        y = ssd_scan(chunk_size=4, **t)
    assert torch.equal(y, ssd_scan_ref(chunk_size=4, **t))
    fake.unsupported = lambda x, dstate: None
    with pytest.raises(AssertionError, match="the Triton backend was called"):
        ssd_scan(chunk_size=4, **t)


def test_auto_falls_back_when_triton_cannot_be_imported():
    cuda_tensor = types.SimpleNamespace(is_cuda=True)  # load_backend only asks where the input lives
    with pytest.warns(UserWarning, match="could not be imported"):
        assert load_backend("kernels.ssd.no_such_backend_for_tests", "auto", cuda_tensor) is None
    with pytest.raises(ImportError):
        load_backend("kernels.ssd.no_such_backend_for_tests", "triton", cuda_tensor)
