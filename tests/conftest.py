import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


# The Triton tests run on a GPU, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1, as CI runs them).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def skip_module_without_triton() -> None:
    """Skip the calling test module where Triton cannot run: no CUDA GPU and no TRITON_INTERPRET=1."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def assert_user_error(script: str, overrides: list[str], expected: list[str], run_dir) -> None:
    """`python script overrides` fails as a user's mistake must: exit 2, one `error: ` line on stderr
    holding every word of `expected`, no traceback, and nothing written to run_dir."""
    proc = subprocess.run([sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, expected)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not Path(run_dir).exists(), "a failed run must leave nothing behind"


def assert_one_error_line(stderr: str, expected: list[str]) -> None:
    """stderr, blank lines aside, is one `error: ` line holding every word of `expected`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in expected:
        assert word in lines[0], lines[0]


def assert_graph_replays_eager(op, static: dict, fresh: dict, names: list[str]):
    """`op(**static)`'s output and its gradients with respect to `static[names]`, captured as a CUDA
    graph, replayed after `fresh` is copied into `static`, equal (to the bit) an eager call on `fresh`:
    no host syncs, nothing of the inputs baked into the graph.

    The upstream gradient enters as a factor of a loss made inside the capture: a gradient tensor
    made outside on the default stream would make the capture wait on that stream (a CUDA error).
    Nothing of an autograd graph from before the capture may stay alive either (its gradient
    accumulators belong to the default stream): the inputs are made leaves (a packed input is a view,
    whose graph holds its base's accumulator) and the output's shape is taken without a graph."""
    static = {k: v.detach().requires_grad_(v.requires_grad) for k, v in static.items()}  # same storage, strides
    with torch.no_grad():
        out = op(**static)
    dout = torch.randn(out.shape, device=out.device, dtype=out.dtype)

    def step():
        out = op(**static)
        return (out.detach(), *torch.autograd.grad((out * dout).sum(), [static[k] for k in names]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and autotune outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        for k in names:
            static[k].copy_(fresh[k])
    graph.replay()
    for name, a, b in zip(["out", *names], outs, step()):
        assert torch.equal(a, b), name


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, floor), in fp64. A floor keeps a reference that is exactly zero (a scan's dA
    at l = 1, where h_{-1} = 0) from giving 0/0."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def fill_cuda_allocator_with_nan() -> None:
    """Fill the caching allocator with NaN (1 GiB): an output element that a kernel never writes then fails."""
    torch.full((1 << 28,), float("nan"), device="cuda")


def assert_matches_oracle(outs: tuple, outs_oracle: tuple, inputs: dict, tol_out: float, tol_grad: float,
                          zero_grads: tuple = ()) -> None:
    """A reference against its per-token oracle: each output, then the gradient of every input for one
    seeded random upstream gradient of each output, by relative error. The inputs in `zero_grads` get no
    gradient from either (both must be exactly zero); every other oracle gradient must be nonzero."""
    for out, out_oracle in zip(outs, outs_oracle):
        assert rel_err(out, out_oracle) < tol_out
    gen = torch.Generator().manual_seed(1)
    douts = [torch.randn(out.shape, generator=gen, dtype=out.dtype) for out in outs]
    names = list(inputs)
    leaves = [inputs[k] for k in names]
    grads = torch.autograd.grad(outs, leaves, douts, allow_unused=True, materialize_grads=True)
    grads_oracle = torch.autograd.grad(outs_oracle, leaves, douts)
    for name, grad, grad_oracle in zip(names, grads, grads_oracle):
        if name in zero_grads:
            assert grad.norm() == grad_oracle.norm() == 0
            continue
        assert grad_oracle.norm() > 0, name
        assert rel_err(grad, grad_oracle) < tol_grad, name


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error relative to the largest expected value."""
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def assert_matches_fp64_reference(name: str, op, ref, inputs: dict, tol: float, tol_of: dict) -> torch.Tensor:
    """`op(**inputs)` and its gradient with respect to every input (for a fixed random upstream
    gradient) against `ref` on fp64 copies of the inputs, by relative error: the output and each
    gradient under `tol`, or `tol_of[input name]` (summed gradients such as a weight's, whose error
    grows with the reduction). Output and gradients finite, each gradient in its input's dtype and shape.
    Prints the errors (pytest -s, or on failure); returns op's output."""
    out = op(**inputs)
    inputs64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out_ref = ref(**inputs64)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    names = list(inputs)
    grads = torch.autograd.grad(out, [inputs[k] for k in names], dout)
    grads_ref = torch.autograd.grad(out_ref, [inputs64[k] for k in names], dout.double())
    errors = {"out": rel_err(out, out_ref)}
    errors |= {f"d{k}": rel_err(g, g_ref) for k, g, g_ref in zip(names, grads, grads_ref)}
    print(name, " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert out.isfinite().all() and errors["out"] < tol
    for k, grad in zip(names, grads):
        assert grad.dtype == inputs[k].dtype and grad.shape == inputs[k].shape, k
        assert grad.isfinite().all(), k
        assert errors[f"d{k}"] < tol_of.get(k, tol), k
    return out


@dataclass(frozen=True)
class ScanDims:
    """A selective scan's sizes, the part of a case its reference and Triton tests share."""
    b: int
    d: int
    l: int
    n: int
    g: int | None  # None: B, C of shape (b, n, l); else (b, g, n, l)

    @property
    def bc_shape(self) -> tuple[int, ...]:
        return (self.b, self.n, self.l) if self.g is None else (self.b, self.g, self.n, self.l)

    def dims(self) -> str:
        groups = "bnl" if self.g is None else f"g{self.g}"
        return f"b{self.b}-d{self.d}-l{self.l}-n{self.n}-{groups}"


@dataclass(frozen=True)
class SSDCase:
    """An SSD scan's sizes and options, for its reference and Triton tests."""
    b: int
    l: int
    h: int
    p: int
    n: int
    g: int
    Q: int
    dtype: torch.dtype | None = None  # the inputs' dtype; None where the test picks it (the reference's fp64)
    z: bool = False
    D: str | None = None  # "h": D (h,), "hp": D (h, p)
    bias: bool = False
    softplus: bool = False
    h0: bool = False  # start from a random initial state

    def __str__(self):
        flags = [name for name in ("z", "bias", "softplus", "h0") if getattr(self, name)]
        flags += [f"D{self.D}"] if self.D else []
        dims = f"b{self.b}-l{self.l}-h{self.h}-p{self.p}-n{self.n}-g{self.g}-Q{self.Q}"
        dtype = [] if self.dtype is None else [str(self.dtype).removeprefix("torch.")]
        return "-".join([dims, *dtype, *flags])


def assert_large_decays_finite_and_accurate(scan, naive, x_shape, dt_shape, A_shape, BC_shape) -> None:
    """A scan reference on Δ up to ~10 with A down to −16 (per-token decays of exp(−160), far below
    fp32's range): `scan(x, Δ, A, B, C) -> (y, state)`, both and every gradient (random upstream
    gradients) finite, and y within 1e-5 of `naive(x, Δ, A, B, C) -> y` on fp64 copies."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen)
    dt = 10 * torch.rand(*dt_shape, generator=gen)
    A = -(1 + 15 * torch.rand(*A_shape, generator=gen))
    B, C = torch.randn(2, *BC_shape, generator=gen)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, state = scan(*leaves)
    grads = torch.autograd.grad((y, state), leaves, (torch.randn_like(y), torch.randn_like(state)))
    assert all(t.isfinite().all() for t in (y, state, *grads))
    with torch.no_grad():
        y_naive = naive(*(t.double() for t in leaves))
    assert rel_err(y, y_naive) < 1e-5


def assert_low_precision_inputs_close_to_oracle(scan, naive, inputs: dict, per_token: tuple, dtype: torch.dtype,
                                                return_state: str) -> None:
    """A scan on `inputs` rounded to `dtype` where named in `per_token` (the scanned input first), to
    fp32 otherwise (A, D, the Δ bias, states: as the models keep them). With `return_state=True`, y
    is in `dtype` and the state fp32, each close to the fp64 `naive` on the same rounded inputs;
    without, the scanned input's gradient is in `dtype` and finite."""
    t = {k: v.detach().to(dtype if k in per_token else torch.float32) for k, v in inputs.items()}
    y, state = scan(**t, **{return_state: True})
    assert y.dtype == dtype and state.dtype == torch.float32
    y_naive, state_naive = naive(**{return_state: True}, **{k: v.double() for k, v in t.items()})
    # One rounding of y to the output dtype, plus fp32 accumulation.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(y, y_naive) < tol
    assert rel_err(state, state_naive) < 1e-5
    x = t[per_token[0]].requires_grad_()
    scan(**t).float().sum().backward()
    assert x.grad.dtype == dtype and x.grad.isfinite().all()
