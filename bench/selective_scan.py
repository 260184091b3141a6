"""Benchmark of the Mamba-1 selective scan: Triton vs the PyTorch reference vs the IO floor.

    python -m bench.selective_scan         # the table for BENCHMARKS.md
    python -m bench.selective_scan --sweep         # also time tile alternatives per kernel
    python -m bench.selective_scan --lm         # also a Mamba-1 LM training step

bf16 u, Δ, B, C, z (B, C shared: (b, n, l)), fp32 A, D, Δ bias, softplus on, as the Mamba block
calls it. IO floor = bytes of u, Δ, B, C, z read and y written, over the measured bandwidth of a
large device-to-device copy (bytes read + written). Times are medians of triton.testing.do_bench,
which flushes L2 between runs. Every measurement is printed as one JSON line as soon as it is
taken, so a crash later in the run loses nothing before it. Needs a CUDA GPU.
"""

import argparse
import datetime
import json
import math

import torch
import triton
from triton.testing import do_bench

from kernels.selective_scan import triton as ss
from kernels.selective_scan.reference import selective_scan_ref

SHAPES = [(64, 256, 1024, 16), (8, 2048, 2048, 16)]  # (b, d, l, n)

# Alternatives for --sweep, per kernel; the first is the default (ss._forward_chunk and
# ss._chunk_size, ss._tile). (BLOCK_D, BLOCK_L, num_warps, maxnreg); maxnreg None: the compiler's
# choice. The backward's BLOCK_D channels sit in each thread when
# BLOCK_L = 32·warps·(steps a thread), as in (2, 128, 1). The forward stores the state after every
# backward chunk, as for training. See bench/notes/selective_scan.md.
FWD_TILES = [(2, 256, 1, None), (1, 512, 1, None), (1, 256, 1, None), (2, 512, 1, None)]
BWD_TILES = [(1, 128, 1, 96), (1, 128, 1, None), (2, 128, 1, 128), (2, 128, 1, 160)]


def emit(kind, row):
    """One measurement as a JSON line, printed at once."""
    print(json.dumps(dict(kind=kind, **row)), flush=True)


def make_inputs(b, d, l, n, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    log_dt = torch.rand(d, device="cuda", generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = torch.exp(log_dt)
    x = dict(
        u=rnd(b, d, l), delta=rnd(b, d, l) * 0.5,
        A=-torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1),  # S4D-real
        B=rnd(b, n, l), C=rnd(b, n, l), D=torch.ones(d, device="cuda"),
        z=rnd(b, d, l), delta_bias=dt + torch.log(-torch.expm1(-dt)),  # softplus⁻¹(dt), Mamba init
    )
    return {k: v.requires_grad_(requires_grad) for k, v in x.items()}


def io_bytes(b, d, l, n):
    return 2 * (4 * b * d * l + 2 * b * n * l)  # bf16: u, Δ, z, y and B, C


def copy_bandwidth():
    x = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16).normal_()  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)


def time_or_oom(fn, rep=100):
    try:
        return do_bench(fn, rep=rep, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def bench_shape(b, d, l, n, bw, with_ref):
    x = make_inputs(b, d, l, n)
    xg = make_inputs(b, d, l, n, requires_grad=True)
    leaves = list(xg.values())
    dy = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = do_bench(lambda: ss.selective_scan_triton(**x, delta_softplus=True), return_mode="median")
    fwdbwd = do_bench(
        lambda: torch.autograd.grad(ss.selective_scan_triton(**xg, delta_softplus=True), leaves, dy),
        return_mode="median",
    )
    row = dict(shape=(b, d, l, n), io_floor_ms=io_bytes(b, d, l, n) / bw * 1e3, triton_fwd_ms=fwd,
               triton_fwdbwd_ms=fwdbwd)
    if with_ref:
        with torch.no_grad():
            row["ref_fwd_ms"] = time_or_oom(lambda: selective_scan_ref(**x, delta_softplus=True), rep=500)
        row["ref_fwdbwd_ms"] = time_or_oom(
            lambda: torch.autograd.grad(selective_scan_ref(**xg, delta_softplus=True), leaves, dy), rep=500)
    emit("shape", row)
    return row


def sweep_shape(b, d, l, n):
    """Each kernel alone, per tile; the backward restarts from states the forward stored."""
    x = make_inputs(b, d, l, n)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dy = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
    rows = []
    for kind, tiles in (("fwd", FWD_TILES), ("bwd", BWD_TILES)):
        for bd, bl, nw, maxnreg in tiles:
            if d % bd:
                continue
            tile = dict(block_d=bd, num_warps=nw, maxnreg=maxnreg)
            if kind == "fwd":
                fn = lambda: ss._selective_scan_fwd(*args, True, True, bl, min(bl, ss._chunk_size(l)),  # noqa: E731
                                                    tile=tile)
            else:
                _, states = ss._selective_scan_fwd(*args, True, False, bl)
                fn = lambda: ss._selective_scan_bwd(dy, *args, True, states, bl, tile=tile)  # noqa: E731
            row = dict(shape=(b, d, l, n), kernel=kind, block_l=bl, **tile)
            try:
                row["ms"] = do_bench(fn, return_mode="median")
            except Exception as e:  # a tile that does not compile (shared memory, registers) is skipped
                row.update(ms=float("nan"), error=f"{type(e).__name__}: {str(e)[:120]}")
            emit("sweep", row)
            rows.append(row)
    return rows


def bench_lm(batch=64, seqlen=1024, vocab=8192):
    """A 2-layer Mamba-1 LM (d_model 128, no MLP) training step under bf16 autocast: forward,
    cross-entropy, backward, AdamW. Also with the mixer forced onto the PyTorch reference."""
    import models.mixers.mamba1
    from kernels.selective_scan import selective_scan
    from models.lm import LM

    def step_ms(backend):
        torch.manual_seed(0)
        models.mixers.mamba1.selective_scan = lambda *a, **k: selective_scan(*a, **k, backend=backend)
        try:
            net = LM(vocab_size=vocab, d_model=128, n_layers=2, mixer="mamba1", max_seqlen=seqlen).cuda()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            ids = torch.randint(vocab, (batch, seqlen), device="cuda")

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = net(ids)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
                loss.backward()
                opt.step()

            return time_or_oom(step, rep=300)
        finally:
            models.mixers.mamba1.selective_scan = selective_scan

    out = dict(batch=batch, seqlen=seqlen, vocab=vocab)
    for backend in ("triton", "torch"):
        row = dict(backend=backend)
        try:
            row["step_ms"] = step_ms(backend)
        except Exception as e:  # one backend failing must not lose the other's number
            row.update(step_ms=float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")
        emit("lm", row)
        out[f"{backend}_step_ms"] = row["step_ms"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="time tile alternatives of each kernel")
    p.add_argument("--lm", action="store_true", help="time a Mamba-1 LM training step")
    p.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--json", help="write all numbers to this file")
    args = p.parse_args()

    props = torch.cuda.get_device_properties(0)
    env = dict(date=datetime.date.today().isoformat(), device=props.name, sms=props.multi_processor_count,
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    bw = copy_bandwidth()
    emit("env", dict(env, copy_bw_tb_s=bw / 1e12))
    out = dict(env=env, copy_bw_tb_s=bw / 1e12)
    out["rows"] = [bench_shape(*shape, bw, not args.no_ref) for shape in SHAPES]
    if args.sweep:
        out["sweep"] = [r for shape in SHAPES for r in sweep_shape(*shape)]
    if args.lm:
        out["lm"] = bench_lm()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    print("\n| (b, d, l, n) | IO floor | Triton fwd | Triton fwd+bwd | ref fwd | ref fwd+bwd |"
          " fwd / floor | fwd+bwd / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        f = r["io_floor_ms"]
        print(f"| {r['shape']} | {f:.3f} ms | {r['triton_fwd_ms']:.3f} ms | {r['triton_fwdbwd_ms']:.3f} ms"
              f" | {r.get('ref_fwd_ms', float('nan')):.2f} ms | {r.get('ref_fwdbwd_ms', float('nan')):.2f} ms"
              f" | {r['triton_fwd_ms'] / f:.1f}x | {r['triton_fwdbwd_ms'] / f:.1f}x |")
    if args.lm:
        lm = out["lm"]
        print(f"\nLM step (2 x Mamba-1, d_model 128, batch {lm['batch']}, L {lm['seqlen']}, "
              f"V {lm['vocab']}, bf16 autocast): Triton {lm['triton_step_ms']:.2f} ms, "
              f"PyTorch reference {lm['torch_step_ms']:.2f} ms")


if __name__ == "__main__":
    main()
