"""Triton selective scan (kernels/selective_scan/triton.py) against the fp64 oracle: outputs, last
states and every gradient (u, delta, A, B, C, D, z, delta_bias) with random upstream gradients;
the decode step against the reference and against the full scan.

On CPU these run through TRITON_INTERPRET=1 at tiny shapes (chunk lengths forced down to 16 so
several chunks and their carried states are exercised; the forward walks up to 2 of them at a time,
storing the state after each); tests marked gpu run at real shapes.
"""

from dataclasses import dataclass

import pytest
import torch

from tests.conftest import ScanDims, fill_cuda_allocator_with_nan, rel_err, skip_module_without_triton

skip_module_without_triton()

from kernels.selective_scan import selective_scan, selective_state_update  # noqa: E402
from kernels.selective_scan.reference import (  # noqa: E402
    selective_scan_naive,
    selective_scan_ref,
    selective_state_update_ref,
)
from kernels.selective_scan.triton import (  # noqa: E402
    SelectiveScanFn,
    selective_scan_triton,
    selective_state_update_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Relative-error bounds: fp32 arithmetic, or outputs and gradients rounded to a 16-bit dtype.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


@dataclass(frozen=True)
class Case(ScanDims):
    chunk: int | None = None  # None: the default chunk length
    gated: bool = True  # D, z, delta_bias and softplus all on (else all off)

    def __str__(self):
        chunk = "" if self.chunk is None else f"-T{self.chunk}"
        return self.dims() + chunk + ("-gated" if self.gated else "")


def make_inputs(case: Case, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor | None]:
    """Leaves on DEVICE; A, D, delta_bias fp32 as in the Mamba block. Δ ≈ 0.05..0.5 keeps states
    alive across many steps, so chunk boundaries matter."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    b, d, l, n = case.b, case.d, case.l, case.n
    x = {
        "u": rand(b, d, l).to(dtype),
        # raw Δ before softplus(· + bias), or Δ itself in (0.05, 0.35)
        "delta": (rand(b, d, l, scale=0.5, shift=-1.5) if case.gated
                  else torch.rand(b, d, l, generator=gen) * 0.3 + 0.05).to(dtype),
        "A": -torch.rand(d, n, generator=gen) * 2 - 0.1,
        "B": rand(*case.bc_shape).to(dtype),
        "C": rand(*case.bc_shape).to(dtype),
        "D": rand(d) if case.gated else None,
        "z": rand(b, d, l).to(dtype) if case.gated else None,
        "delta_bias": rand(d, scale=0.5) if case.gated else None,
    }
    return {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in x.items()}


def run_triton(x, case: Case, return_last_state=False):
    if case.chunk is None:
        return selective_scan_triton(**x, delta_softplus=case.gated, return_last_state=return_last_state)
    for_backward = torch.is_grad_enabled()
    return SelectiveScanFn.apply(*(x[k] for k in NAMES), case.gated, return_last_state, case.chunk, for_backward)


def check_against(oracle, case: Case, dtype: torch.dtype, seed: int, tol: float):
    """y, last state and all gradients of the Triton scan vs `oracle` on fp64 copies of the inputs."""
    x = make_inputs(case, dtype, seed)
    y, last = run_triton(x, case, return_last_state=True)
    assert y.dtype == dtype and y.shape == x["u"].shape
    assert last.dtype == torch.float32 and last.shape == (case.b, case.d, case.n)
    leaves = [k for k in NAMES if x[k] is not None]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [x[k] for k in leaves], dy)

    x64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in x.items()}
    y64, last64 = oracle(**x64, delta_softplus=case.gated, return_last_state=True)
    grads64 = torch.autograd.grad(y64, [x64[k] for k in leaves], dy.double())

    errors = {"y": rel_err(y, y64), "last_state": rel_err(last, last64)}
    for k, g, g64 in zip(leaves, grads, grads64):
        assert g.dtype == x[k].dtype and g.shape == x[k].shape, k
        errors["d" + k] = rel_err(g, g64, floor=1e-6)  # dA is exactly zero at l = 1 (h_{-1} = 0)
    assert all(e < tol for e in errors.values()), errors  # NaN fails too


CPU_CASES = [
    Case(2, 4, 37, 3, None),  # one chunk, l not a power of two
    Case(2, 4, 37, 4, 2, chunk=16),  # three chunks, grouped B/C
    Case(1, 6, 20, 5, 3, chunk=16, gated=False),  # odd channels per group: one channel a program
    Case(2, 8, 16, 4, None, chunk=16),  # l exactly one chunk
    Case(1, 4, 1, 2, None),  # a single step
    Case(1, 16, 37, 2, None),  # several channel blocks of one group add into dB, dC
    Case(1, 4, 300, 3, 2),  # the default chunks of 128: three; two channels a program (few dB/dC rows)
    Case(17, 2, 140, 2, None),  # more dB/dC rows: one channel a backward program
    Case(1, 4, 150, 3, None, chunk=16),  # forward chunks of 32 (2 backward chunks): 5, the last one partial
]


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_scan_fp32(case):
    check_against(selective_scan_naive, case, torch.float32, seed=0, tol=TOL[torch.float32])


@pytest.mark.parametrize("case", CPU_CASES[-2:], ids=str)
def test_forward_without_backward(case):
    """Without a backward to follow, the forward stores the state only after each of its own chunks
    (2 of the backward's), not after each backward chunk: the same y and last state, bit for bit."""
    x = make_inputs(case, torch.float32, seed=6)
    with torch.no_grad():
        y, last = run_triton(x, case, return_last_state=True)
    y_grad, last_grad = run_triton(x, case, return_last_state=True)
    assert y_grad.requires_grad and torch.equal(y, y_grad) and torch.equal(last, last_grad)
    x64 = {k: None if v is None else v.detach().double() for k, v in x.items()}
    y64, last64 = selective_scan_naive(**x64, delta_softplus=case.gated, return_last_state=True)
    assert rel_err(y, y64) < TOL[torch.float32] and rel_err(last, last64) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scan_half(dtype):
    check_against(selective_scan_naive, Case(2, 4, 33, 4, None, chunk=16), dtype, seed=1, tol=TOL[dtype])


def test_mixed_input_dtypes():
    """u, z in bf16 with Δ, B, C in fp32 (as autocast can leave them): each grad keeps its dtype."""
    case = Case(1, 4, 21, 3, None, chunk=16)
    x = make_inputs(case, torch.float32, seed=2)
    x["u"] = x["u"].detach().bfloat16().requires_grad_()
    x["z"] = x["z"].detach().bfloat16().requires_grad_()
    y = run_triton(x, case)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [x[k] for k in NAMES], torch.randn_like(y))
    x64 = {k: v.detach().double() for k, v in x.items()}
    y64 = selective_scan_naive(**x64, delta_softplus=True)
    assert rel_err(y, y64) < TOL[torch.bfloat16]
    assert [g.dtype for g in grads] == [x[k].dtype for k in NAMES]


def test_public_dispatch_and_non_contiguous():
    """backend="triton" reaches this module; views with a strided last axis (as the Mamba block
    passes after its transposes) give the same result as contiguous copies."""
    case = Case(2, 4, 19, 3, None)
    x = make_inputs(case, torch.float32, seed=3)
    y = selective_scan(**x, delta_softplus=True, backend="triton")
    u_t = x["u"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) = d
    B_t = x["B"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    y_t = selective_scan_triton(**{**x, "u": u_t, "B": B_t}, delta_softplus=True)
    assert torch.equal(y, y_t)
    assert rel_err(y, selective_scan_ref(**x, delta_softplus=True)) < 1e-5


def test_bad_shapes_raise():
    x = make_inputs(Case(1, 4, 8, 2, None), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"^A\(5, 2\)"):
        selective_scan_triton(x["u"], x["delta"], torch.zeros(5, 2), x["B"], x["C"])
    with pytest.raises(ValueError, match=r"^B\(1, 3, 2, 8\)"):
        selective_scan_triton(x["u"], x["delta"], x["A"], torch.zeros(1, 3, 2, 8), x["C"])


def step_inputs(b, d, n, g, seed):
    gen = torch.Generator().manual_seed(seed)
    bc = (b, n) if g is None else (b, g, n)
    x = dict(
        x=torch.randn(b, d, generator=gen), dt=torch.randn(b, d, generator=gen) * 0.5 - 1.5,
        A=-torch.rand(d, n, generator=gen) * 2 - 0.1, B=torch.randn(*bc, generator=gen),
        C=torch.randn(*bc, generator=gen), D=torch.randn(d, generator=gen),
        z=torch.randn(b, d, generator=gen), dt_bias=torch.randn(d, generator=gen) * 0.5,
    )
    return {k: v.to(DEVICE) for k, v in x.items()}, torch.randn(b, d, n, generator=gen).to(DEVICE)


@pytest.mark.parametrize("g", [None, 2], ids=["bn", "g2"])
def test_state_update_matches_reference(g):
    x, state = step_inputs(2, 6, 5, g, seed=4)
    state_ref = state.clone()
    y = selective_state_update_triton(state, **x, dt_softplus=True)
    y_ref = selective_state_update_ref(state_ref, **x, dt_softplus=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(state, state_ref) < 1e-5
    assert selective_state_update(state.clone(), **x, dt_softplus=True, backend="triton").shape == y.shape


def test_decode_steps_equal_scan():
    """Token-by-token decoding from h = 0 reproduces the full scan's outputs and last state."""
    case = Case(2, 4, 12, 3, 2)
    x = {k: None if v is None else v.detach() for k, v in make_inputs(case, torch.float32, seed=5).items()}
    y, last = selective_scan_triton(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(case.b, case.d, case.n, device=DEVICE)
    steps = [
        selective_state_update_triton(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t],
            D=x["D"], z=x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=True,
        )
        for t in range(case.l)
    ]
    assert rel_err(torch.stack(steps, -1), y) < 1e-5
    assert rel_err(state, last) < 1e-5


GPU_CASES = [
    Case(2, 256, 1000, 16, None),  # one chunk
    Case(1, 128, 4500, 16, 2),  # three chunks of 2048, grouped
    Case(3, 96, 777, 16, 3, chunk=64, gated=False),  # many short chunks, 32 channels per group
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_scan_gpu(case, dtype):
    fill_cuda_allocator_with_nan()
    check_against(selective_scan_ref, case, dtype, seed=6, tol=TOL[dtype])


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Forward and backward capture in a CUDA graph (no host syncs) and replay to the same values."""
    case = Case(2, 64, 300, 16, None)
    x = make_inputs(case, torch.bfloat16, seed=7)
    dy = torch.randn_like(x["u"])
    leaves = [x[k] for k in NAMES]

    def step():
        y = selective_scan_triton(**x, delta_softplus=True)
        return (y.detach(), *torch.autograd.grad(y, leaves, dy))  # frees the autograd graph

    # Warm up (and compile) on a side stream, as torch.cuda.graph's documentation prescribes.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step()
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("y", *NAMES), eager, captured):
        # fp32 atomics sum dB and dC over channels in any order, and a last-bit difference can round
        # to the neighbouring bf16 value: a few elements one bf16 step (2^-8 relative) apart.
        assert rel_err(b, a) < (1e-3 if name in ("B", "C") else 1e-5), name

