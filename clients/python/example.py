"""Example: model info, a streamed chat answer, and a question against an uploaded document."""
import argparse
import sys

from kvq_client import Client


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--document", help="a text file to upload as a session")
    args = ap.parse_args()
    with Client(args.server) as c:
        info = c.model_info()
        print(f"{info.name}: {info.layers} layers, KV {info.kv_format}, fits {info.max_context_tokens} tokens")
        for piece in c.generate_stream("Write one sentence about the sea.", max_tokens=48):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        if args.document:
            text = open(args.document, encoding="utf-8").read()
            s = c.create_session("example-doc", text,
                                 progress=lambda p: print(f"\rprefilled {p.tokens_prefilled} tokens", end=""))
            print(f"\nsession: {s.tokens} tokens")
            r = c.generate("\nQuestion: what is this text about?\nAnswer:", session_id="example-doc",
                           chat=False, max_tokens=40)
            print(r.text, f"[TTFT {r.usage.time_to_first_token_seconds:.3f}s, cached {r.usage.cached_tokens}]")
            c.delete_session("example-doc")


if __name__ == "__main__":
    main()
