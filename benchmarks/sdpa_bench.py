#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of kernels_bench --prefill_rows: the fp16
baselines (cuDNN and flash backends) for kvq's prefill attention.

For each shape and past length: N query rows against `past` keys (no mask), and the N x N causal
chunk. Prints time (median of CUDA-event timings) and TFLOP/s with the same FLOP counts as
kernels_bench (4 * N * n_heads * keys * head_dim; half of N * N for the causal chunk).

  python3 benchmarks/sdpa_bench.py [--rows 4096] [--past 4096,32768,131072] [--shapes llama3-8b,...]

--decode: the fp16 decode baselines of kernels_bench's decode table instead: one query row per
sequence (q: batch x n_heads x 1 x head_dim) against `context` cached keys and values per sequence,
GQA native (enable_gqa=True; a backend that refuses it is retried on K/V with the KV heads repeated
to the query heads, and the row says so, since it then reads group-times more bytes). K/V are
views into one pool in the [token][kv head][head dim] order of a serving cache (BSHD, as the
paged kernels read it); when batch x context does not fit in --mem_gb, sequences start at
staggered offsets inside the pool (their bytes overlap but no two sequences read the same bytes
at the same time, as kernels_bench's wrapped block tables), and the row says "pool wraps". Each
sample times 4 calls queued back to back (no host launch gaps, like kernels_bench); median of
--iters samples. Prints a table; --json=FILE writes the rows (benchmarks/decode_table.py joins them
with kernels_bench's).

  python3 benchmarks/sdpa_bench.py --decode [--contexts 32768,131072,1048576] [--batches 1,8,32]
      [--shapes ...] [--backends cudnn,flash] [--mem_gb 48] [--json out.json]
"""
import argparse
import json

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


def decode_bytes(nh, nkv, hd, ctx, batch):
    """Bytes a decode step must move: fp16 K and V of every cached token, q and o (kernels_bench's
    fp16 count, without its fp32 lse)."""
    return batch * (2.0 * ctx * nkv * hd * 2 + 2.0 * nh * hd * 2)


def run_decode(args):
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    backends = args.backends.split(",")
    rows = []
    print("| shape | context | batch | backend | time (us) | MB read | GB/s | GQA | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    mem_bytes = int(args.mem_gb * (1 << 30))
    for sname in args.shapes.split(","):
        nh, nkv, hd = SHAPES[sname]
        g = nh // nkv
        for ctx in [int(x) for x in args.contexts.split(",")]:
            for batch in [int(x) for x in args.batches.split(",")]:
                tok_bytes = nkv * hd * 2
                pool_tokens = min(batch * ctx, max(ctx, mem_bytes // (2 * tok_bytes)))
                note = "pool wraps" if pool_tokens < batch * ctx else ""
                # Sequence b starts at token b * step of the pool (step = ctx when it all fits).
                step = ctx if batch == 1 or not note else (pool_tokens - ctx) // (batch - 1)
                kpool = torch.empty(pool_tokens * nkv * hd, device="cuda", dtype=torch.float16).normal_()
                vpool = torch.empty_like(kpool).normal_()
                shape = (batch, nkv, ctx, hd)
                strides = (step * nkv * hd, hd, nkv * hd, 1)
                k = kpool.as_strided(shape, strides)
                v = vpool.as_strided(shape, strides)
                q = torch.randn(batch, nh, 1, hd, device="cuda", dtype=torch.float16)
                mb = decode_bytes(nh, nkv, hd, ctx, batch) / 1e6
                for bname in backends:
                    backend = BACKENDS[bname]
                    row = {"shape": sname, "context": ctx, "batch": batch, "backend": bname, "us": 0.0,
                           "mbytes": mb, "gbs": 0.0, "gqa": "native", "note": note, "ok": False}
                    try:
                        with sdpa_kernel(backend):
                            try:
                                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                fn()
                            except RuntimeError:
                                if g == 1:
                                    raise
                                # The backend refuses GQA: K/V heads repeated (g times the bytes).
                                row["gqa"] = f"repeated x{g}"
                                kr = k.repeat_interleave(g, dim=1)
                                vr = v.repeat_interleave(g, dim=1)
                                fn = lambda: F.scaled_dot_product_attention(q, kr, vr)
                                fn()
                            t = median_ms(lambda: [fn() for _ in range(4)], args.iters) / 4
                        row.update(us=t * 1e3, gbs=mb * 1e6 / (t * 1e-3) / 1e9, ok=True)
                    except RuntimeError as e:  # not available for this shape (or out of memory)
                        row["note"] = (note + "; " if note else "") + "n/a: " + str(e).splitlines()[0][:80]
                    finally:
                        kr = vr = None
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"| {sname} | {ctx} | {batch} | {bname} | {row['us']:.1f} | {mb:.1f} | {row['gbs']:.0f} | "
                          f"{row['gqa']} | {row['note']} |", flush=True)
                del k, v, kpool, vpool, q
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(), "rows": rows}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--past", default="4096,32768,131072")
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b,smollm2-135m")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--backends", default="cudnn,flash")
    ap.add_argument("--mem_gb", type=float, default=48.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.decode:
        run_decode(args)
        return
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
