#!/usr/bin/env python3
"""Golden outputs of SmolLM2-135M-Instruct from an independent implementation (Hugging Face
transformers, fp32, loading the same GGUF file), for kvq's forward-pass tests and the README's
reference perplexities.

Writes to OUT_DIR:
  golden.json        prompts, HF token ids, top-20 logits at every position, greedy continuations
  golden_full.bin    full fp32 logits (little-endian) at the first and last position of each prompt
  ppl.json           reference perplexity on the corpora test splits (non-overlapping windows)

Usage (needs torch, transformers, gguf; runs on CPU or GPU):
  python3 tools/make_golden.py MODEL.gguf OUT_DIR [--corpora DIR] [--contexts 2048,8192]
"""
import argparse, json, math, os, struct, sys, time

import torch
from transformers import AutoModelForCausalLM

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth. And the earth was without form,",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--corpora", default="")
    ap.add_argument("--contexts", default="2048")
    ap.add_argument("--greedy_tokens", type=int, default=32)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    d, f = os.path.split(os.path.abspath(a.model))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Token ids come from the Hugging Face `tokenizers` library configured as SmolLM2's own
    # tokenizer.json (transformers' GGUF path does not know the "smollm" pre-tokenizer and would
    # drop its per-digit split); see tools/make_tokenizer_fixtures.py.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_tokenizer_fixtures import build_reference, render
    ref_tok, meta = build_reference(os.path.abspath(a.model))
    eos_id = ref_tok.token_to_id(meta["eos_token"])

    def encode(text):
        return ref_tok.encode(text, add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).to(dev).eval()
    print("loaded", type(model).__name__, "on", dev, flush=True)

    texts = list(PROMPTS)
    chat_text = render(meta["chat_template"], CHAT, True, meta["bos_token"], meta["eos_token"])
    texts.append(chat_text)
    golden = {"model": f, "transformers": __import__("transformers").__version__,
              "torch": torch.__version__, "device": dev, "cases": []}
    full = bytearray()
    for text in texts:
        ids = encode(text)
        x = torch.tensor([ids], device=dev)
        with torch.no_grad():
            logits = model(x).logits[0].float().cpu()
        top = torch.topk(logits, 20, dim=-1)
        gen = model.generate(x, max_new_tokens=a.greedy_tokens, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=eos_id)
        cont = gen[0, len(ids):].tolist()
        golden["cases"].append({
            "text": text, "ids": ids,
            "top_ids": top.indices.tolist(), "top_logits": top.values.tolist(),
            "max_abs_logit": logits.abs().max(dim=-1).values.tolist(),
            "greedy": cont, "greedy_text": ref_tok.decode(cont, skip_special_tokens=False),
        })
        for pos in (0, len(ids) - 1):
            full += struct.pack("<%df" % logits.shape[1], *logits[pos].tolist())
        print(repr(text[:40]), len(ids), "->", repr(ref_tok.decode(cont)[:60]), flush=True)
    with open(os.path.join(a.out, "golden.json"), "w") as fh:
        json.dump(golden, fh)
    with open(os.path.join(a.out, "golden_full.bin"), "wb") as fh:
        fh.write(full)

    if a.corpora:
        ppl = {}
        for name in ("kjv", "austen"):
            path = os.path.join(a.corpora, name + ".test.txt")
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            ids = encode(text)
            for ctx in [int(c) for c in a.contexts.split(",")]:
                nll, n, windows, t0 = 0.0, 0, 0, time.time()
                for begin in range(0, len(ids) - 1, ctx):
                    chunk = ids[begin:begin + ctx]
                    if len(chunk) < 2:
                        break
                    x = torch.tensor([chunk], device=dev)
                    with torch.no_grad():
                        lg = model(x).logits[0].double()
                    lp = torch.log_softmax(lg[:-1], dim=-1)
                    tgt = x[0, 1:]
                    nll += -lp.gather(1, tgt[:, None]).sum().item()
                    n += len(chunk) - 1
                    windows += 1
                ppl[f"{name}@{ctx}"] = {"tokens": n, "windows": windows, "corpus_tokens": len(ids),
                                        "nll": nll / n, "ppl": math.exp(nll / n),
                                        "seconds": time.time() - t0}
                print(name, ctx, ppl[f"{name}@{ctx}"], flush=True)
        with open(os.path.join(a.out, "ppl.json"), "w") as fh:
            json.dump(ppl, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
