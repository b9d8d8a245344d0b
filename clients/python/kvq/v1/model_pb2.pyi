from kvq.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "chat", "add_bos", "return_pieces")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PIECES_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    chat: _generate_pb2.ChatPrompt
    add_bos: bool
    return_pieces: bool
    def __init__(self, text: _Optional[bytes] = ..., chat: _Optional[_Union[_generate_pb2.ChatPrompt, _Mapping]] = ..., add_bos: _Optional[bool] = ..., return_pieces: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "pieces")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[str]] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "device", "kv_bytes_capacity", "kv_bytes_used")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    kv_bytes_capacity: int
    kv_bytes_used: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., kv_bytes_capacity: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "arch", "layers", "hidden", "heads", "kv_heads", "head_dim", "vocab_size", "trained_context", "kv_format", "quantizer", "effective_bits_per_element", "outlier_fraction", "max_context_tokens", "kv_bytes_capacity", "kv_bytes_used", "ranks", "max_batch", "prefill_chunk", "sessions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRAINED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZER_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_BITS_PER_ELEMENT_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    trained_context: int
    kv_format: str
    quantizer: str
    effective_bits_per_element: float
    outlier_fraction: float
    max_context_tokens: int
    kv_bytes_capacity: int
    kv_bytes_used: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    max_batch: int
    prefill_chunk: int
    sessions: int
    def __init__(self, name: _Optional[str] = ..., arch: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., trained_context: _Optional[int] = ..., kv_format: _Optional[str] = ..., quantizer: _Optional[str] = ..., effective_bits_per_element: _Optional[float] = ..., outlier_fraction: _Optional[float] = ..., max_context_tokens: _Optional[int] = ..., kv_bytes_capacity: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ..., max_batch: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., sessions: _Optional[int] = ...) -> None: ...
