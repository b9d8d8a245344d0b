"""A small client for kvqd: streaming generation, sessions, tokenization, model info."""
from kvq_client.client import Client, GenerateResult, KvqError

__all__ = ["Client", "GenerateResult", "KvqError"]
