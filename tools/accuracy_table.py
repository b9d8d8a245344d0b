#!/usr/bin/env python3
"""The KVQuant accuracy table of kvq on a real model: perplexity with every KV format of the
ablation, on the test splits of both corpora, by `kvq eval-ppl` (which evaluates as if every token
had been decoded from the compressed cache): on the CPU reference, or with --kvq_args
"--device cuda --kv_host" on a GPU with the KV cache still quantized by the CPU reference.

  python3 tools/accuracy_table.py --kvq build/tools/kvq --model M.gguf --corpora DIR \
      --quantizers DIR [--context 2048] [--max_windows 0] [--jobs 8] [--out results.json]

Quantizers (DIR/<format>.kvqq, Fisher-weighted, and DIR/unweighted/<format>.kvqq) come from
scripts/calibrate.sh. Prints a markdown table; --out keeps the raw JSON lines.
"""
import argparse, concurrent.futures, json, os, subprocess, sys

# (row label, kv format, quantizer file under --quantizers or None)
ROWS = [
    ("fp16", "fp16", None),
    ("int4 (per-token)", "int4", None),
    ("int3 (per-token)", "int3", None),
    ("int2 (per-token)", "int2", None),
    ("int3 per-channel post-RoPE", "int3-pc-post", "int3-pc-post.kvqq"),
    ("int3 per-channel pre-RoPE", "int3-pc-pre", "int3-pc-pre.kvqq"),
    ("nuq4", "nuq4", "nuq4.kvqq"),
    ("nuq3", "nuq3", "nuq3.kvqq"),
    ("nuq2", "nuq2", "nuq2.kvqq"),
    ("nuq4-1%", "nuq4-1%", "nuq4-1%.kvqq"),
    ("nuq3-1%", "nuq3-1%", "nuq3-1%.kvqq"),
    ("nuq2-1%", "nuq2-1%", "nuq2-1%.kvqq"),
    ("nuq3-1%, no Fisher weighting", "nuq3-1%", "unweighted/nuq3-1%.kvqq"),
    ("nuq2-1%, no Fisher weighting", "nuq2-1%", "unweighted/nuq2-1%.kvqq"),
    ("nuq3-1%, no sink", "nuq3-1%-nosink", "nuq3-1%.kvqq"),
    ("nuq2-1%, no sink", "nuq2-1%-nosink", "nuq2-1%.kvqq"),
    ("nuq2-1%, no Q-Norm", "nuq2-1%-noqnorm", "nuq2-1%.kvqq"),
]
CORPORA = ["kjv", "austen"]


def run(args, fmt, quant, corpus):
    cmd = [args.kvq, "eval-ppl", "--model", args.model, "--text",
           os.path.join(args.corpora, corpus + ".test.txt"), "--context", str(args.context),
           "--stride", str(args.context), "--max_windows", str(args.max_windows),
           "--kv_format", fmt, "--threads", str(args.threads)]
    if quant:
        cmd += ["--quantizer", os.path.join(args.quantizers, quant)]
    cmd += args.kvq_args.split()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(" ".join(cmd) + "\n" + out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["corpus"] = corpus
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvq", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpora", required=True)
    ap.add_argument("--quantizers", required=True)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--max_windows", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
    ap.add_argument("--out", default="")
    ap.add_argument("--kvq_args", default="",
                    help="extra kvq flags, e.g. '--device cuda --kv_host' (GPU forward pass, KV in "
                         "the CPU reference quantizer: every format, exact quantization)")
    a = ap.parse_args()
    rows = ROWS if not a.rows else [ROWS[int(i)] for i in a.rows.split(",")]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        futs = {ex.submit(run, a, fmt, q, c): (label, c) for label, fmt, q in rows for c in CORPORA}
        out = open(a.out, "w") if a.out else None
        for f in concurrent.futures.as_completed(futs):
            label, c = futs[f]
            results[(label, c)] = f.result()
            print(f"done: {label} / {c}: ppl {results[(label, c)]['ppl']:.4f}", file=sys.stderr, flush=True)
            if out:  # as results arrive, so a run cut short keeps what it finished
                out.write(json.dumps(dict(results[(label, c)], row=label)) + "\n")
                out.flush()
    print_table(rows, results, a.context)


def print_table(rows, results, context):
    base = {c: results[("fp16", c)]["ppl"] for c in CORPORA if ("fp16", c) in results}
    toks = {c: results[(rows[0][0], c)]["tokens"] for c in CORPORA}
    print(f"| KV format | PPL KJV | ΔPPL KJV | PPL Austen | ΔPPL Austen | bits/elem | compression vs fp16 |")
    print("|---|---|---|---|---|---|---|")
    for label, fmt, q in rows:
        cells = []
        for c in CORPORA:
            r = results[(label, c)]
            d = (r["ppl"] / base[c] - 1) * 100 if c in base else float("nan")
            cells += [f"{r['ppl']:.3f}", "—" if label == "fp16" else f"{d:+.2f}%"]
        bits = results[(label, CORPORA[0])]["bits_per_element"]
        print(f"| {label} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {bits:.3f} | {16 / bits:.2f}× |")
    print(f"\nEvaluated tokens: KJV {toks['kjv']}, Austen {toks['austen']}; context {context}, "
          f"non-overlapping windows.")


def table_from_jsonl(paths, context=2048):
    """Prints the table from --out files (e.g. of several partial runs)."""
    results = {}
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            results[(r["row"], r["corpus"])] = r
    rows = [row for row in ROWS if all((row[0], c) in results for c in CORPORA)]
    print_table(rows, results, context)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--from_jsonl":
        table_from_jsonl(sys.argv[2:])
    else:
        main()
