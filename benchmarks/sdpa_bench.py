#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of kernels_bench --prefill_rows: the fp16
baselines (cuDNN and flash backends) for kvq's prefill attention.

For each shape and past length: N query rows against `past` keys (no mask), and the N x N causal
chunk. Prints time (median of CUDA-event timings) and TFLOP/s with the same FLOP counts as
kernels_bench (4 * N * n_heads * keys * head_dim; half of N * N for the causal chunk).

  python3 benchmarks/sdpa_bench.py [--rows 4096] [--past 4096,32768,131072] [--shapes llama3-8b,...]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128), "smollm2-135m": (9, 3, 64)}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def median_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--past", default="4096,32768,131072")
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b,smollm2-135m")
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args()
    n = args.rows
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| shape | past | query rows | backend | past (us) | TFLOP/s | causal chunk (us) | chunk TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for sname in args.shapes.split(","):
        nh, nkv, hd = SHAPES[sname]
        q = torch.randn(1, nh, n, hd, device="cuda", dtype=torch.float16)
        kc = torch.randn(1, nh, n, hd, device="cuda", dtype=torch.float16)
        vc = torch.randn(1, nh, n, hd, device="cuda", dtype=torch.float16)
        for past in [int(x) for x in args.past.split(",")]:
            # GQA as the kernels see it: kv heads repeated to the query heads (no copy per call).
            k = torch.randn(1, nkv, past, hd, device="cuda", dtype=torch.float16).repeat_interleave(nh // nkv, dim=1)
            v = torch.randn(1, nkv, past, hd, device="cuda", dtype=torch.float16).repeat_interleave(nh // nkv, dim=1)
            for bname, backend in BACKENDS.items():
                try:
                    with sdpa_kernel(backend):
                        t_past = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.iters)
                        t_chunk = median_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, is_causal=True), args.iters)
                except RuntimeError as e:  # backend not available for this shape
                    print(f"| {sname} | {past} | {n} | {bname} | n/a ({str(e).splitlines()[0][:60]}) | | | |")
                    continue
                fp = 4.0 * n * nh * past * hd
                fc = 2.0 * n * nh * n * hd
                print(f"| {sname} | {past} | {n} | {bname} | {t_past * 1e3:.1f} | {fp / (t_past * 1e-3) / 1e12:.0f} | "
                      f"{t_chunk * 1e3:.1f} | {fc / (t_chunk * 1e-3) / 1e12:.0f} |", flush=True)
            del k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
