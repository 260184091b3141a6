"""What the kernel benchmarks of elementwise-like ops share: timing, the copy-bandwidth floor and the
table (`bench/conv1d.py`, `bench/gated_norm.py`). Needs a CUDA GPU."""

import argparse
import datetime
import json

import torch
import triton


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def time_op(op, inputs: tuple) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of out = op(*inputs), the backward for a random upstream
    gradient with respect to every input."""
    dout = torch.randn(inputs[0].shape, device="cuda", dtype=inputs[0].dtype)

    def fwd():
        with torch.no_grad():
            op(*inputs)

    def fwd_bwd():
        torch.autograd.grad(op(*inputs), inputs, dout)

    return bench_ms(fwd), bench_ms(fwd_bwd)


def main(doc: str, shapes, layouts, make_inputs, triton_op, ref_op, floor_reads: tuple[int, int], header: str,
         note: str):
    """Time `triton_op` and `ref_op` at every (shape, layout), print each row as a JSON line when taken,
    then the Markdown table. `make_inputs(*shape, layout)` gives the inputs, the first one the size of
    the output; `floor_reads` = (forward, forward+backward) tensors of that size that must cross memory
    (read or written) at least once; `header` names the shape and layout columns."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--json", help="write all numbers to this file")
    args = p.parse_args()
    props = torch.cuda.get_device_properties(0)
    env = dict(date=datetime.date.today().isoformat(), device=props.name, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda)
    bw = copy_bandwidth()
    print(json.dumps(dict(kind="env", **env, copy_bw_tb_s=bw / 1e12)), flush=True)
    rows = []
    for shape in shapes:
        for layout in layouts:
            inputs = make_inputs(*shape, layout)
            size = inputs[0].numel() * inputs[0].element_size()
            row = dict(shape=str(tuple(shape)), layout=layout, floor_fwd_ms=floor_reads[0] * size / bw * 1e3,
                       floor_fwd_bwd_ms=floor_reads[1] * size / bw * 1e3)
            row["triton_fwd_ms"], row["triton_fwd_bwd_ms"] = time_op(triton_op, inputs)
            row["ref_fwd_ms"], row["ref_fwd_bwd_ms"] = time_op(ref_op, inputs)
            print(json.dumps(dict(kind="row", **row)), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_bw_tb_s=bw / 1e12, rows=rows), f, indent=1)

    print(f"\n{env['device']} · torch {env['torch']} · triton {env['triton']} · copy {bw / 1e12:.2f} TB/s · {note}\n")
    print(f"| {header} | floor fwd | Triton fwd | ref fwd | speed-up | floor fwd+bwd | Triton fwd+bwd "
          "| ref fwd+bwd | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layout']} | {r['floor_fwd_ms']:.4f} ms | {r['triton_fwd_ms']:.4f} ms "
              f"| {r['ref_fwd_ms']:.4f} ms | {r['ref_fwd_ms'] / r['triton_fwd_ms']:.1f}x "
              f"| {r['floor_fwd_bwd_ms']:.4f} ms | {r['triton_fwd_bwd_ms']:.4f} ms | {r['ref_fwd_bwd_ms']:.4f} ms "
              f"| {r['ref_fwd_bwd_ms'] / r['triton_fwd_bwd_ms']:.1f}x |")
