"""Thin wrapper over the generated kvq.v1 stubs. Unset sampling fields keep the server defaults."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional, Sequence, Union

import grpc

from kvq.v1 import generate_pb2, kvq_service_pb2_grpc, model_pb2, session_pb2


class KvqError(Exception):
    """An RPC failed; .code is the grpc.StatusCode, str() the server's message."""

    def __init__(self, err: grpc.RpcError):
        super().__init__(f"{err.code().name}: {err.details()}")
        self.code = err.code()


@dataclasses.dataclass
class GenerateResult:
    text: str
    token_ids: list
    finish_reason: str
    usage: generate_pb2.Usage
    request_id: int


Messages = Sequence[dict]  # [{"role": "user", "content": "..."}]


def _sampling(**kw) -> generate_pb2.SamplingParams:
    p = generate_pb2.SamplingParams()
    for name, value in kw.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(p, name).extend(value)
        else:
            setattr(p, name, value)
    return p


class Client:
    def __init__(self, target: str = "127.0.0.1:50051", timeout: Optional[float] = None):
        self._channel = grpc.insecure_channel(target)
        self._stub = kvq_service_pb2_grpc.KvqStub(self._channel)
        self._timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, prompt: Union[str, Messages, Sequence[int]], session_id: str, chat: bool,
                 **sampling) -> generate_pb2.GenerateRequest:
        req = generate_pb2.GenerateRequest(session_id=session_id, sampling=_sampling(**sampling))
        if isinstance(prompt, str):
            if chat:
                req.chat.messages.add(role="user", content=prompt.encode())
            else:
                req.text = prompt.encode()
        elif prompt and isinstance(prompt[0], dict):
            for m in prompt:
                req.chat.messages.add(role=m["role"], content=m["content"].encode())
        else:
            req.token_ids.ids.extend(prompt)
        return req

    def generate_events(self, prompt, session_id: str = "", chat: bool = True,
                        **sampling) -> Iterator[generate_pb2.GenerateResponse]:
        """Raw response stream. Sampling: temperature, top_p, top_k, min_p, repetition_penalty,
        seed, max_tokens, stop, stop_token_ids, ignore_eos, logprobs, top_logprobs."""
        req = self._request(prompt, session_id, chat, **sampling)
        try:
            yield from self._stub.Generate(req, timeout=self._timeout)
        except grpc.RpcError as e:
            raise KvqError(e) from None

    def generate_stream(self, prompt, session_id: str = "", chat: bool = True, **sampling) -> Iterator[str]:
        """Yields text as it is generated (complete UTF-8 characters, never a stop string)."""
        for ev in self.generate_events(prompt, session_id, chat, **sampling):
            if ev.HasField("delta") and ev.delta.text:
                yield ev.delta.text

    def generate(self, prompt, session_id: str = "", chat: bool = True, **sampling) -> GenerateResult:
        text, ids, rid = [], [], 0
        fin = generate_pb2.Finished()
        for ev in self.generate_events(prompt, session_id, chat, **sampling):
            kind = ev.WhichOneof("event")
            if kind == "started":
                rid = ev.started.request_id
            elif kind == "delta":
                text.append(ev.delta.text)
                ids.extend(ev.delta.token_ids)
            elif kind == "finished":
                fin = ev.finished
        return GenerateResult("".join(text), ids, generate_pb2.FinishReason.Name(fin.reason), fin.usage, rid)

    def abort(self, request_id: int) -> None:
        self._call(self._stub.Abort, generate_pb2.AbortRequest(request_id=request_id))

    def create_session(self, session_id: str, document: Union[str, bytes, Sequence[int]],
                       ttl_seconds: Optional[int] = None, chunk_bytes: int = 1 << 16,
                       progress: Optional[Callable[[session_pb2.SessionProgress], None]] = None
                       ) -> session_pb2.Session:
        """Uploads a document in chunks; progress(SessionProgress) is called as the server reports."""
        def requests():
            first = session_pb2.CreateSessionRequest(session_id=session_id)
            if ttl_seconds is not None:
                first.ttl_seconds = ttl_seconds
            if isinstance(document, (str, bytes)):
                data = document.encode() if isinstance(document, str) else document
                chunks = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
                for i, c in enumerate(chunks):
                    msg = first if i == 0 else session_pb2.CreateSessionRequest()
                    msg.text = c
                    yield msg
            else:
                ids = list(document)
                step = max(1, chunk_bytes // 4)
                for i in range(0, max(1, len(ids)), step):
                    msg = first if i == 0 else session_pb2.CreateSessionRequest()
                    msg.token_ids.ids.extend(ids[i:i + step])
                    yield msg

        session = None
        try:
            for resp in self._stub.CreateSession(requests(), timeout=self._timeout):
                if resp.HasField("progress") and progress:
                    progress(resp.progress)
                elif resp.HasField("session"):
                    session = resp.session
        except grpc.RpcError as e:
            raise KvqError(e) from None
        return session

    def get_session(self, session_id: str) -> session_pb2.Session:
        return self._call(self._stub.GetSession, session_pb2.GetSessionRequest(session_id=session_id))

    def list_sessions(self) -> list:
        return list(self._call(self._stub.ListSessions, session_pb2.ListSessionsRequest()).sessions)

    def delete_session(self, session_id: str) -> None:
        self._call(self._stub.DeleteSession, session_pb2.DeleteSessionRequest(session_id=session_id))

    def save_session(self, session_id: str, name: str = "") -> session_pb2.SaveSessionResponse:
        return self._call(self._stub.SaveSession, session_pb2.SaveSessionRequest(session_id=session_id, name=name))

    def restore_session(self, session_id: str, name: str = "") -> session_pb2.Session:
        return self._call(self._stub.RestoreSession,
                          session_pb2.RestoreSessionRequest(session_id=session_id, name=name))

    def tokenize(self, text: str, add_bos: bool = True) -> list:
        r = self._call(self._stub.Tokenize, model_pb2.TokenizeRequest(text=text.encode(), add_bos=add_bos))
        return list(r.token_ids)

    def count_tokens(self, text: str) -> int:
        return self._call(self._stub.CountTokens, model_pb2.TokenizeRequest(text=text.encode())).count

    def model_info(self) -> model_pb2.ModelInfo:
        return self._call(self._stub.GetModelInfo, model_pb2.GetModelInfoRequest())

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as e:
            raise KvqError(e) from None
