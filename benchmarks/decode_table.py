#!/usr/bin/env python3
"""Decode attention against every fp16 baseline, one command per GPU (issue #4's speed table).

Runs kernels_bench (kvq's decode kernels: fp16 and the quantized formats, one layer) and then
PyTorch's scaled_dot_product_attention on the same shapes, contexts and batches (sdpa_bench.py
--decode: cuDNN and flash backends, fp16 K/V, GQA native), on the same GPU, one after the other,
and prints one markdown table: time, bytes that must move, achieved GB/s, that over the streaming
read bandwidth kernels_bench measured (the floor of a kernel that reads its bytes once), and the
speedup over each fp16 baseline: our fp16 kernel, cuDNN SDPA, flash SDPA, and the best of the three.

  python3 benchmarks/decode_table.py --bench BUILD/benchmarks/kernels_bench \\
      [--shapes llama3-8b,llama2-7b,smollm2-135m] [--formats fp16,nuq4-1%,nuq3-1%,nuq2-1%] \\
      [--contexts 32768,131072,1048576,2097152] [--batches 1,8,32] [--iters 5] [--sink 1] \\
      [--mem_gb 48] [--out DIR]

The raw outputs (both JSON files, both logs) go to --out (default: a temporary directory).
`--from DIR` prints the table again from such a directory (e.g. one copied back from a GPU
machine) without running anything; --bench is then not needed.
Contexts count kvq's fp16 sink tokens (--sink); SDPA gets the same number of tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(cmd, log):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.stderr.write(open(log).read()[-4000:])
        sys.exit(f"{cmd[0]} failed with exit code {r.returncode} (log: {log})")


def ratio(base_us, us):
    return f"{base_us / us:.2f}" if base_us and us else "—"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", help="path to the kernels_bench binary")
    ap.add_argument("--from", dest="from_dir", default="",
                    help="print the table from the JSON files of an earlier --out directory")
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b,smollm2-135m")
    ap.add_argument("--formats", default="fp16,nuq4-1%,nuq3-1%,nuq2-1%")
    ap.add_argument("--contexts", default="32768,131072,1048576,2097152")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sink", type=int, default=1)
    ap.add_argument("--mem_gb", type=float, default=48.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.from_dir:
        out = args.from_dir
        kj, sj = os.path.join(out, "kernels_bench.json"), os.path.join(out, "sdpa_decode.json")
        for f in (kj, sj):
            if not os.path.isfile(f):
                sys.exit(f"--from {out}: {f} is missing (expected the --out directory of an earlier run)")
        print_table(kj, sj, out)
        return
    if not args.bench:
        sys.exit("--bench PATH (the kernels_bench binary) is required unless --from DIR is given")
    if "fp16" not in args.formats.split(","):
        sys.exit("--formats must include fp16 (our fp16 kernel is one of the baselines)")
    out = args.out or tempfile.mkdtemp(prefix="kvq_decode_table_")
    os.makedirs(out, exist_ok=True)
    kj, sj = os.path.join(out, "kernels_bench.json"), os.path.join(out, "sdpa_decode.json")
    run([args.bench, f"--shapes={args.shapes}", f"--formats={args.formats}", f"--contexts={args.contexts}",
         f"--batches={args.batches}", f"--iters={args.iters}", f"--sink={args.sink}", f"--mem_gb={args.mem_gb}",
         f"--json={kj}"], os.path.join(out, "kernels_bench.log"))
    here = os.path.dirname(os.path.abspath(__file__))
    run([sys.executable, os.path.join(here, "sdpa_bench.py"), "--decode", f"--shapes={args.shapes}",
         f"--contexts={args.contexts}", f"--batches={args.batches}", f"--iters={args.iters}",
         f"--mem_gb={args.mem_gb}", f"--json={sj}"], os.path.join(out, "sdpa_decode.log"))
    print_table(kj, sj, out)


def print_table(kj, sj, out):
    kb, sd = json.load(open(kj)), json.load(open(sj))
    read_gbs = kb["read_gbs"]
    sdpa = {}
    for r in sd["rows"]:
        if r["ok"]:
            sdpa[(r["shape"], r["context"], r["batch"], r["backend"])] = r
    ours = {(r["shape"], r["context"], r["batch"]): r for r in kb["rows"] if r["format"] == "fp16" and r["ok"]}

    print(f"## Decode attention, one layer: kvq against fp16 baselines ({kb['device']})\n")
    print(f"Streaming read bandwidth {read_gbs:.0f} GB/s, D2D copy {kb['copy_gbs']:.0f} GB/s (kernels_bench); "
          f"PyTorch {sd['torch']}, cuDNN {sd['cudnn']}. Speedups: baseline time / this row's time.\n")
    print("| shape | context | batch | format | time (us) | MB read | GB/s | of read BW | vs our fp16 | vs cuDNN SDPA "
          "| vs flash SDPA | vs best fp16 | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in kb["rows"]:
        key = (r["shape"], r["context"], r["batch"])
        if not r["ok"]:
            print(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['format']} | — | | | | | | | | {r['note']} |")
            continue
        base = {"ours": ours[key]["us"] if key in ours else 0.0}
        for b in ("cudnn", "flash"):
            base[b] = sdpa[key + (b,)]["us"] if key + (b,) in sdpa else 0.0
        best = min([t for t in base.values() if t > 0], default=0.0)
        print(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['format']} | {r['us']:.1f} | {r['mbytes']:.1f} | "
              f"{r['gbs']:.0f} | {100 * r['gbs'] / read_gbs:.1f}% | {ratio(base['ours'], r['us'])} | "
              f"{ratio(base['cudnn'], r['us'])} | {ratio(base['flash'], r['us'])} | {ratio(best, r['us'])} | {r['note']} |")
    print("\n### The SDPA baselines (fp16 K/V)\n")
    print("| shape | context | batch | backend | time (us) | MB read | GB/s | of read BW | GQA | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sd["rows"]:
        t = f"{r['us']:.1f}" if r["ok"] else "—"
        frac = f"{100 * r['gbs'] / read_gbs:.1f}%" if r["ok"] else ""
        print(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['backend']} | {t} | {r['mbytes']:.1f} | "
              f"{r['gbs']:.0f} | {frac} | {r['gqa']} | {r['note']} |")
    print(f"\n(raw outputs: {out})")


if __name__ == "__main__":
    main()
