#!/usr/bin/env python3
"""Sensitivity weights for KVQuant calibration: the diagonal Fisher information of every pre-RoPE
key and value activation, i.e. the squared gradient of the language-model loss with respect to it
(KVQuant, Hooper et al. 2024, section 3.3). The C++ calibrator (`kvq calibrate`) collects the
activations itself with kvq's forward pass over the same token windows and weights its k-means by
these numbers.

Independent of kvq: Hugging Face transformers (fp32) loads the same GGUF file. The pre-RoPE keys
and values are the outputs of k_proj and v_proj (transformers un-permutes GGUF q/k weights into the
Hugging Face layout, as kvq does), so channels line up one to one.

Input:  calibration token windows written by `kvq calibrate --dump_ids FILE`
        (int32 little-endian: n_windows, window_len, then the ids).
Output: KVQFISH1 file: int64 n_layers, n_tokens, kv_dim; then per layer K fisher [n_tokens, kv_dim]
        and V fisher [n_tokens, kv_dim], float32 little-endian, tokens in window order.

Usage: python3 tools/fisher.py MODEL.gguf IDS.bin OUT.bin     (needs torch, transformers, gguf)
"""
import os, struct, sys, time

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    model_path, ids_path, out_path = sys.argv[1:4]
    raw = np.fromfile(ids_path, dtype="<i4")
    n_win, win = int(raw[0]), int(raw[1])
    ids = raw[2:].reshape(n_win, win)
    d, f = os.path.split(os.path.abspath(model_path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    layers = model.model.layers
    n_layers = len(layers)
    kv_dim = layers[0].self_attn.k_proj.out_features
    acts = {}

    def hook(name):
        def fn(module, inp, out):
            out.retain_grad()
            acts[name] = out
        return fn

    for i, layer in enumerate(layers):
        layer.self_attn.k_proj.register_forward_hook(hook(("k", i)))
        layer.self_attn.v_proj.register_forward_hook(hook(("v", i)))
    fk = np.zeros((n_layers, n_win * win, kv_dim), dtype=np.float32)
    fv = np.zeros((n_layers, n_win * win, kv_dim), dtype=np.float32)
    t0 = time.time()
    for w in range(n_win):
        x = torch.tensor(ids[w:w + 1], dtype=torch.long)
        model.zero_grad(set_to_none=True)
        out = model(x, labels=x)
        out.loss.backward()
        for i in range(n_layers):
            fk[i, w * win:(w + 1) * win] = (acts[("k", i)].grad[0] ** 2).numpy()
            fv[i, w * win:(w + 1) * win] = (acts[("v", i)].grad[0] ** 2).numpy()
        acts.clear()
        print(f"window {w + 1}/{n_win}: loss {out.loss.item():.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    with open(out_path + ".part", "wb") as fh:
        fh.write(b"KVQFISH1")
        fh.write(struct.pack("<qqq", n_layers, n_win * win, kv_dim))
        for i in range(n_layers):
            fh.write(fk[i].tobytes())
            fh.write(fv[i].tobytes())
    os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main()
