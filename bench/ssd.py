"""Time the Triton SSD against its peers on one GPU, in bf16: forward and forward+backward of

    ours      `kernels.ssd.triton.ssd_scan_triton` (eager, and replayed from a CUDA graph)
    mamba     mamba_ssm 2.3.2's `mamba_chunk_scan_combined` (its Triton kernels)
    sdpa      PyTorch SDPA flash attention, causal, on q = k = v of shape (b, h, l, p)
    ref       `kernels.ssd.reference.ssd_scan_ref` (PyTorch)

plus the IO floor (bytes every input is read and every output written once, over the measured
device-to-device copy bandwidth) and the time of one training step of a 2-layer Mamba-2 LM with
the Triton path against the reference.

    python -m bench.ssd [--shapes workbench,paper,batch] [--paths fused,chunked] [--json out.json] [--no-lm]
    python -m bench.ssd --host     # CPU only: host time per call with the launches stubbed

mamba_ssm is optional (its column reads n/a without it). A wheel built with MAMBA_SKIP_CUDA_BUILD
has only the Triton kernels, but its package `__init__` imports the CUDA extension it lacks, so the
package is registered as a bare module and only `mamba_ssm.ops.triton.ssd_combined` is imported.
"""

import argparse
import functools
import importlib.util
import json
import math
import sys
import time
import types

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.ssd import chunk, fused, step
from kernels.ssd.reference import ssd_scan_ref
from kernels.ssd.triton import _use_fused, ssd_scan_triton

SHAPES = {  # (b, l, h, p, n)
    "workbench": [(64, 1024, 4, 64, 64), (256, 256, 8, 32, 64)],
    "paper": [(4, 4096, 64, 64, 128), (2, 16384, 32, 64, 128)],
    # b·h below and around the 132 SMs of an H200: where `_use_fused` switches paths
    "batch": [(1, 16384, 32, 64, 128), (2, 16384, 32, 64, 128), (3, 16384, 32, 64, 128)],
}
CHUNK = 256
DTYPE = torch.bfloat16
PATHS = ("fused", "chunked")  # our two Triton paths; "auto" picks one by the shape
EAGER_ROUNDS = 3


def load_mamba_chunk_scan():
    """mamba_ssm's `mamba_chunk_scan_combined` without running the package's `__init__`, or None."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> float:
    """Median time of `fn` replayed from a CUDA graph: the kernels without Python or launch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate() -> float:
    """bf16 FLOP/s of a large matrix product on random data."""
    a, b = torch.randn(2, 8192, 8192, device="cuda", dtype=DTYPE)
    return 2 * 8192**3 / (bench_ms(lambda: a @ b) * 1e-3)


def make_inputs(b, l, h, p, n, seed=0):
    """Mamba-2's setting: D per head, dt_bias with softplus, one group, no gate (the block gates in its norm)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    t = dict(
        x=torch.randn(b, l, h, p, dtype=DTYPE, **kw),
        dt=(torch.randn(b, l, h, **kw) - 2).to(DTYPE),
        A=-torch.empty(h, device="cuda").uniform_(1, 16, generator=gen),
        B=torch.randn(b, l, 1, n, dtype=DTYPE, **kw),
        C=torch.randn(b, l, 1, n, dtype=DTYPE, **kw),
        D=torch.randn(h, **kw),
        dt_bias=torch.randn(h, **kw) * 0.5,
    )
    return {k: v.requires_grad_() for k, v in t.items()}


def io_bytes(b, l, h, p, n):
    """Fewest bytes: forward reads x, dt, B, C and writes y; backward also reads dy and writes dx, ddt, dB, dC."""
    e = DTYPE.itemsize
    inputs = e * (b * l * h * p + b * l * h + 2 * b * l * n)
    outputs = e * b * l * h * p
    return inputs + outputs, 2 * (inputs + outputs)


def flops(b, l, h, p, n):
    """Fewest forward FLOPs: causal halves of C Bᵀ (once per group) and of (C Bᵀ ∘ L) x, plus states in and out."""
    nchunks = math.ceil(l / CHUNK)
    Q = CHUNK
    return b * nchunks * (Q * Q * n + h * (Q * Q * p + 4 * Q * p * n))


def time_shape(b, l, h, p, n, mamba, paths=PATHS):
    t = make_inputs(b, l, h, p, n)
    leaves = list(t.values())
    dy = torch.randn(b, l, h, p, device="cuda", dtype=DTYPE)
    args = dict(chunk_size=CHUNK, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    scan_in = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    q = torch.randn(b, h, l, p, device="cuda", dtype=DTYPE, requires_grad=True)
    k, v = torch.randn(2, b, h, l, p, device="cuda", dtype=DTYPE, requires_grad=True).unbind(0)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls = {path: functools.partial(ssd_scan_triton, *scan_in, **args, path=path) for path in paths}
    impls["ref"] = lambda: ssd_scan_ref(*scan_in, **args)
    impls["sdpa"] = sdpa
    if mamba is not None:  # last: a failed graph capture of it must not disturb the others
        impls["mamba"] = lambda: mamba(*scan_in, **args)

    auto = {key: _use_fused((b, l, h, p), torch.device("cuda"), key == "fwdbwd") for key in ("fwd", "fwdbwd")}
    row = {f"auto_{key}": "fused" if fused else "chunked" for key, fused in auto.items()}
    with torch.no_grad():
        ref = impls["ref"]().float()
        for name in ("fused", "chunked", "mamba"):
            if name in impls:
                row[f"rel_err_{name}_vs_ref"] = ((impls[name]().float() - ref).norm() / ref.norm()).item()
        del ref
    passes = {}  # (name, pass) -> function
    for name, fn in impls.items():
        inputs = [q, k, v] if name == "sdpa" else leaves
        grad_out = torch.randn_like(q) if name == "sdpa" else dy
        passes[name, "fwd"] = torch.no_grad()(fn)
        passes[name, "fwdbwd"] = functools.partial(_fwdbwd, fn, inputs, grad_out)
    # Eager times are the host's where it is slower than the GPU, and the host's speed drifts over seconds
    # (BENCHMARKS.md, the SSD's version notes, v6): the peers take turns over EAGER_ROUNDS rounds, and each keeps its median round.
    eager = {key: [] for key in passes}  # a peer that fails (out of memory, say) leaves, the others stay
    for _ in range(EAGER_ROUNDS):
        for key in list(eager):
            ms = _timed(bench_ms, passes[key], key, (b, l, h, p, n))
            if ms is None:
                del eager[key]
            else:
                eager[key].append(ms)
    for (name, pass_), times in eager.items():
        row[f"{name}_{pass_}"] = sorted(times)[len(times) // 2]
        if name in (*PATHS, "mamba"):  # kernel time without the host: replayed from a CUDA graph
            ms = _timed(graph_ms, passes[name, pass_], (name, pass_), (b, l, h, p, n))
            if ms is not None:
                row[f"{name}_graph_{pass_}"] = ms
    torch.cuda.empty_cache()
    return row


def _fwdbwd(fn, inputs, grad_out):
    return torch.autograd.grad(fn(), inputs, grad_out)


def _timed(timer, fn, key, shape) -> float | None:
    """timer(fn), or None (and a line saying why) if fn failed."""
    try:
        return timer(fn)
    except Exception as e:
        print(f"  {key} at {shape}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        return None


def scan_fwdbwd(t: dict, dy, path: str):
    """One forward+backward of `ssd_scan_triton` on `path`, in the bench's setting, with inputs t (as from
    `make_inputs`) and output gradient dy."""
    def fwdbwd():
        y = ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, D=t["D"], dt_bias=t["dt_bias"],
                            dt_softplus=True, path=path)
        torch.autograd.grad(y, list(t.values()), dy)

    return fwdbwd


def profile(b, l, h, p, n, path):
    """Print the GPU time of each of our kernels in one forward+backward on `path`, and the host time."""
    dy = torch.randn(b, l, h, p, device="cuda", dtype=DTYPE)
    fwdbwd = scan_fwdbwd(make_inputs(b, l, h, p, n), dy, path)
    for _ in range(3):
        fwdbwd()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fwdbwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40), flush=True)
    # Host time of one call: launches queue asynchronously, so this is what the CPU spends per step.
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fwdbwd()
    host = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    print(f"{path} at {(b, l, h, p, n)}: host time per forward+backward: {host:.3f} ms", flush=True)


def report_kernels():
    """Registers and spills of every compiled variant of our kernels (the compiler's resource report)."""
    for module, name in _kernels():
        caches = getattr(module, name).jit.device_caches  # through `fast_launch` to the JIT function
        for cache in caches.values():
            for kernel in (cache[0] if isinstance(cache, tuple) else cache).values():
                try:
                    kernel._init_handles()
                    meta = kernel.metadata
                    print(f"{name}: warps {meta.num_warps} stages {meta.num_stages} regs {kernel.n_regs} "
                          f"spills {kernel.n_spills} shared {meta.shared}", flush=True)
                except Exception as e:
                    print(f"{name}: {type(e).__name__}: {e}")


def _kernels():
    """(module, name) of every Triton kernel of the SSD."""
    return [(m, name) for m in (chunk, fused, step) for name in dir(m) if name.startswith("_") and name.endswith("_kernel")]


def lm_step_ms(backend: str) -> float:
    """One training step (bf16 autocast forward, cross-entropy, backward, AdamW) of the 2-layer Mamba-2 LM."""
    import kernels.ssd
    import models.mixers.mamba2
    from models.lm import LM

    models.mixers.mamba2.ssd_scan = functools.partial(kernels.ssd.ssd_scan, backend=backend)
    torch.manual_seed(0)
    model = LM(vocab_size=8192, d_model=128, n_layers=2, mixer="mamba2", d_state=64, headdim=32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 8192, (64, 1025), device="cuda")
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inputs)  # (b, l, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return bench_ms(step)


def host_us(path: str, repeats: int = 7, calls: int = 200) -> float:
    """Median host time (µs) of one forward+backward on `path` with every Triton launch stubbed out,
    on the CPU: what Python, autograd and the torch calls around the kernels cost, which is what an
    eager step pays on top of the GPU time when the GPU is the faster of the two."""
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernels = {(module, name): getattr(module, name) for module, name in _kernels()}
    b, l, h, p, n = 2, 64, 4, 16, 16  # tiny: the stubbed launches make the host cost shape-independent
    t = {k: v.requires_grad_() for k, v in dict(
        x=torch.randn(b, l, h, p), dt=torch.randn(b, l, h), A=-torch.rand(h), B=torch.randn(b, l, 1, n),
        C=torch.randn(b, l, 1, n), D=torch.randn(h), dt_bias=torch.randn(h)).items()}
    fwdbwd = scan_fwdbwd(t, torch.randn(b, l, h, p), path)
    try:
        for module, name in kernels:
            setattr(module, name, NoLaunch())
        for _ in range(calls // 4):
            fwdbwd()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fwdbwd()
            times.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)
    return sorted(times)[repeats // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="workbench,paper")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-lm", action="store_true")
    parser.add_argument("--paths", default=",".join(PATHS), help="our Triton paths to time (fused, chunked)")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of ours, forward+backward")
    parser.add_argument("--host", action="store_true",
                        help="only the host time of each path with the launches stubbed (CPU, no GPU needed)")
    opts = parser.parse_args()
    if opts.host:
        for path in PATHS:
            print(f"{path}: {host_us(path):.0f} us of host time per forward+backward (launches stubbed)")
        return

    props = torch.cuda.get_device_properties(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    info = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                copy_TBps=bw / 1e12, bf16_TFLOPs=rate / 1e12)
    try:
        mamba = load_mamba_chunk_scan()
    except Exception as e:
        print(f"mamba_ssm could not be loaded: {type(e).__name__}: {e}")
        mamba = None
    print(json.dumps(info), flush=True)

    rows = []
    for group in opts.shapes.split(","):
        for shape in SHAPES[group]:
            fwd_bytes, fwdbwd_bytes = io_bytes(*shape)
            row = dict(shape=shape, group=group, io_fwd=fwd_bytes / bw * 1e3, io_fwdbwd=fwdbwd_bytes / bw * 1e3,
                       flop_fwd=flops(*shape) / rate * 1e3)
            row.update(time_shape(*shape, mamba, paths=opts.paths.split(",")))
            if opts.profile:
                for path in PATHS:
                    profile(*shape, path)
            rows.append(row)
            print(json.dumps(row), flush=True)

    lm = {}
    if not opts.no_lm:
        for backend in ("triton", "torch"):
            try:
                lm[backend] = lm_step_ms(backend)
            except Exception as e:
                print(f"LM step with backend={backend}: {type(e).__name__}: {e}", flush=True)
        print(json.dumps(dict(lm_step_ms=lm)), flush=True)

    if opts.profile:
        report_kernels()

    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(info=info, rows=rows, lm_step_ms=lm), f, indent=1)

    def cell(row, key):
        return f"{row[key]:.3f}" if key in row else "n/a"

    def ratio(row, key):
        m, o = row.get(f"mamba_{key}"), row.get(f"{row[f'auto_{key}']}_{key}")
        return f"{m / o:.1f}x" if m and o else "n/a"

    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}, bf16, chunk {CHUNK}; "
          f"copy {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s; times in ms (median)")
    head = ["(b, l, h, p, n)", "pass", "fused", "fused graph", "chunked", "chunked graph", "mamba_ssm",
            "mamba_ssm graph", "mamba/ours (auto path)", "sdpa", "ref", "IO floor"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        for key in ("fwd", "fwdbwd"):
            cells = [str(tuple(row["shape"])), "fwd" if key == "fwd" else "fwd+bwd",
                     *(cell(row, f"{path}{graph}_{key}") for path in PATHS for graph in ("", "_graph")),
                     cell(row, f"mamba_{key}"), cell(row, f"mamba_graph_{key}"), f"{ratio(row, key)} ({row[f'auto_{key}']})",
                     cell(row, f"sdpa_{key}"), cell(row, f"ref_{key}"), f"{row[f'io_{key}']:.3f}"]
            print("| " + " | ".join(cells) + " |")
    if lm:
        print("\nLM training step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in lm.items()))


if __name__ == "__main__":
    main()
