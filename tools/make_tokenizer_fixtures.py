#!/usr/bin/env python3
"""Tokenizer fixtures for kvq's tokenizer tests, from an independent implementation (Hugging Face
`tokenizers` + jinja2), and the Unicode category tables of model/unicode_tables.cc.

Reference tokenizer. transformers can read a GGUF tokenizer (AutoTokenizer.from_pretrained(dir,
gguf_file=...)) but that path imports torch, and it does not know tokenizer.ggml.pre = "smollm":
it would fall back to the plain GPT-2 ByteLevel split and miss SmolLM2's per-digit split. So we
build the `tokenizers.Tokenizer` from the GGUF vocabulary and merges ourselves, with the exact
pre-tokenizer of SmolLM2's tokenizer.json on the Hub:
  Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false, trim_offsets=true,
           use_regex=true)],  decoder ByteLevel, control tokens (token_type 3) as special
           added tokens (normalized=false), user-defined (4) as plain added tokens.
Chat templates are rendered with jinja2 the way transformers does (ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, raise_exception).

Writes to OUT_DIR (tests/fixtures/tokenizer):
  strings.json      tricky strings: ids (parse_special on and off) and decoded text
  chat.json         chat templates (the model's, and reference Llama-3 / Llama-2 templates) and
                    their renderings of a set of conversations
  corpus.json       per corpus file: line count, byte count, FNV-1a 64 of the whole id stream
  <name>.hashes     per line, FNV-1a 64 (little-endian u64) of the ids as little-endian u32
  <name>.ids        for the test splits, per line: u32 count, then count x u16 ids

Usage:
  pip install tokenizers jinja2 gguf
  python3 tools/make_tokenizer_fixtures.py fixtures MODEL.gguf CORPORA_DIR tests/fixtures/tokenizer
  python3 tools/make_tokenizer_fixtures.py unicode-tables model/unicode_tables.cc
"""
import json
import os
import struct
import sys
import unicodedata

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1

TRAIN_SPLITS = ["kjv.train.txt", "austen.train.txt"]
TEST_SPLITS = ["kjv.test.txt", "austen.test.txt"]

TRICKY = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "Hello world",
    " Hello world",
    "Hello  world",
    "Hello   world  ",
    "Hello\n\nworld\n",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed \t \n end",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'd've, THEY'RE, O'Neil's",
    "'s 't 're 've 'm 'll 'd 'x ''s",
    "Numbers 12345 and 3.14159 and 1,000,000 and -42 x2 2x 007",
    "a1b2c3 123abc abc123 1 2  3   4",
    "Unicode digits: \u0661\u0662\u0663 \u0967\u0968 \u00b2\u00b3 \u2167 \u00bd",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m \u00fcber Stra\u00dfe",
    "e\u0301 combining acute, n\u0303",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca \u30fc",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\u0420\u043e\u0441\u0441\u0438\u044f \u0438 \u0423\u043a\u0440\u0430\u0457\u043d\u0430",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0394\u03b5\u03b9\u03ba\u03c4\u03b9\u03ba\u03cc \u03b1\u03bb\u03c6\u03ac\u03b2\u03b7\u03c4\u03bf",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 and \u2764\ufe0f \U0001F9D1\u200d\U0001F4BB",
    "\U0001F600",
    "\U0001F600\U0001F600\U0001F600",
    "Punctuation!!! ??? ... --- (parens) [brackets] {braces} <angle> \"quotes\" \u201csmart\u201d \u2018q\u2019",
    "zero\u200bwidth and non\u00a0breaking and em\u2003space and \u3000ideographic",
    "def foo(x):\n    return x ** 2  # comment\n\n\tif x:\n\t\tpass\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text <|im_end|>",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|> partial <|im_sta rt|> <|im_end",
    "<repo_name>x<file_sep>y<filename>z<gh_stars>10",
    "http://example.com/path?q=1&r=2#frag user@mail.com",
    "ALL CAPS and MiXeD cAsE and camelCaseWords and snake_case_words",
    "\u00a1Hola! \u00bfQu\u00e9 tal? \u00c0 bient\u00f4t, \u0153uvre",
    "\x00\x01\x7f control chars \x1b[0m",
    "\u200d\u200c\ufeff",
    "a" * 300,
    " " * 50 + "x",
    "\n" * 20 + "y",
    "$$$ %%% ^^^ &&& *** ___ ~~~ ``` |||",
]

# Reference templates (as shipped by meta-llama/Meta-Llama-3-8B-Instruct and Llama-2-7b-chat-hf).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "  padded question \n"},
     {"role": "assistant", "content": "\nAn answer.  "},
     {"role": "user", "content": "Thanks \u2014 caf\u00e9 \U0001F600"}],
    [{"role": "system", "content": "Multi\nline\nsystem"},
     {"role": "user", "content": "one"},
     {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}],
]


def fnv1a64(ids):
    h = FNV_OFFSET
    for i in ids:
        for b in struct.pack("<I", i & 0xFFFFFFFF):
            h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def read_lines(path):
    with open(path, "rb") as f:
        data = f.read().decode("utf-8")
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def build_reference(gguf_path):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(gguf_path)

    def field(name):
        return r.fields[name].contents()

    assert field("tokenizer.ggml.model") == "gpt2", "this script mirrors the gpt2/smollm tokenizer"
    assert field("tokenizer.ggml.pre") == "smollm"
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        tok.add_tokens(user)
    meta = {
        "chat_template": field("tokenizer.chat_template"),
        "bos_token": tokens[field("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[field("tokenizer.ggml.eos_token_id")],
    }
    return tok, meta


def render(template, messages, add_generation_prompt, bos_token, eos_token):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        return {"error": str(e)}


def encode(tok, text, parse_special):
    tok.encode_special_tokens = not parse_special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def make_fixtures(gguf_path, corpora, out):
    os.makedirs(out, exist_ok=True)
    tok, meta = build_reference(gguf_path)

    tricky = list(TRICKY)
    austen = os.path.join(corpora, "austen.test.txt")
    if os.path.exists(austen):  # multi-line text: newline runs between paragraphs
        tricky.append("\n".join(read_lines(austen)[:120]) + "\n")
    cases = []
    for text in tricky:
        ids = encode(tok, text, True)
        cases.append({
            "text": text,
            "ids": ids,
            "ids_no_special": encode(tok, text, False),
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    with open(os.path.join(out, "strings.json"), "w", encoding="utf-8") as f:
        json.dump({"reference": "tokenizers " + __import__("tokenizers").__version__,
                   "cases": cases}, f, ensure_ascii=False, indent=0)

    templates = [
        {"name": "model", "template": meta["chat_template"], "bos_token": meta["bos_token"],
         "eos_token": meta["eos_token"]},
        {"name": "chatml", "template": PLAIN_CHATML_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"},
        {"name": "llama3", "template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>",
         "eos_token": "<|eot_id|>"},
        {"name": "llama2", "template": LLAMA2_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"},
    ]
    for t in templates:
        t["renders"] = []
        for conv in CONVERSATIONS:
            for gen in (False, True):
                t["renders"].append({
                    "messages": conv, "add_generation_prompt": gen,
                    "output": render(t["template"], conv, gen, t["bos_token"], t["eos_token"])})
    with open(os.path.join(out, "chat.json"), "w", encoding="utf-8") as f:
        json.dump({"templates": templates}, f, ensure_ascii=False, indent=1)

    summary = {}
    for name in TRAIN_SPLITS + TEST_SPLITS:
        path = os.path.join(corpora, name)
        lines = read_lines(path)
        all_ids = tok.encode_batch([l for l in lines], add_special_tokens=False)
        stream = []
        base = os.path.join(out, name[: -len(".txt")])
        with open(base + ".hashes", "wb") as f:
            for enc in all_ids:
                f.write(struct.pack("<Q", fnv1a64(enc.ids)))
                stream.extend(enc.ids)
        if name in TEST_SPLITS:
            with open(base + ".ids", "wb") as f:
                for enc in all_ids:
                    assert all(i < 65536 for i in enc.ids)
                    f.write(struct.pack("<I", len(enc.ids)))
                    f.write(struct.pack("<%dH" % len(enc.ids), *enc.ids))
        summary[name] = {"lines": len(lines), "bytes": os.path.getsize(path), "tokens": len(stream),
                         "fnv1a64": "%016x" % fnv1a64(stream)}
        print(name, summary[name], file=sys.stderr)
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(summary, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Unicode tables

def ranges(pred):
    out, start = [], None
    for cp in range(0x110000):
        if pred(cp):
            if start is None:
                start = cp
        elif start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, 0x10FFFF))
    return out


def make_unicode_tables(path):
    letter = ranges(lambda c: unicodedata.category(chr(c)).startswith("L"))
    number = ranges(lambda c: unicodedata.category(chr(c)).startswith("N"))

    def table(name, rs):
        body = []
        line = "   "
        for a, b in rs:
            item = " {0x%X, 0x%X}," % (a, b)
            if len(line) + len(item) > 100:
                body.append(line)
                line = "   "
            line += item
        body.append(line)
        return "constexpr CodepointRange %s[] = {\n%s\n};\n" % (name, "\n".join(body))

    text = f"""// GENERATED by tools/make_tokenizer_fixtures.py unicode-tables (Unicode {unicodedata.unidata_version}).
// Do not edit. General categories L* (letters) and N* (numbers) as sorted inclusive ranges.
#include "model/unicode_tables.h"

namespace kvq::model::unicode {{
namespace {{

{table("kLetterRanges", letter)}
{table("kNumberRanges", number)}
}}  // namespace

const CodepointRange* LetterRanges(int* n) {{
  *n = static_cast<int>(sizeof(kLetterRanges) / sizeof(kLetterRanges[0]));
  return kLetterRanges;
}}

const CodepointRange* NumberRanges(int* n) {{
  *n = static_cast<int>(sizeof(kNumberRanges) / sizeof(kNumberRanges[0]));
  return kNumberRanges;
}}

const char* UnicodeVersion() {{ return "{unicodedata.unidata_version}"; }}

}}  // namespace kvq::model::unicode
"""
    with open(path, "w") as f:
        f.write(text)
    print(f"{path}: {len(letter)} letter ranges, {len(number)} number ranges", file=sys.stderr)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "fixtures":
        make_fixtures(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 3 and sys.argv[1] == "unicode-tables":
        make_unicode_tables(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
