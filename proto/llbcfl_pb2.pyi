from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_CLIENT: _ClassVar[Role]
    ROLE_MINER: _ClassVar[Role]
    ROLE_SERVER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_CLIENT: Role
ROLE_MINER: Role
ROLE_SERVER: Role

class Envelope(_message.Message):
    __slots__ = ("kind", "payload", "signer", "signature")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload: bytes
    signer: bytes
    signature: bytes
    def __init__(self, kind: _Optional[str] = ..., payload: _Optional[bytes] = ..., signer: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorStreamHeader(_message.Message):
    __slots__ = ("round", "sender_id", "base_digest", "num_samples", "tensors", "total_bytes", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    sender_id: str
    base_digest: bytes
    num_samples: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    auth: Envelope
    def __init__(self, round: _Optional[int] = ..., sender_id: _Optional[str] = ..., base_digest: _Optional[bytes] = ..., num_samples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., auth: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorStreamTrailer(_message.Message):
    __slots__ = ("digest", "claim")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    claim: Envelope
    def __init__(self, digest: _Optional[bytes] = ..., claim: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class TensorStreamPart(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: TensorStreamHeader
    chunk: TensorChunk
    trailer: TensorStreamTrailer
    def __init__(self, header: _Optional[_Union[TensorStreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[TensorStreamTrailer, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "role", "round", "chain_height", "head_hash", "genesis_digest", "view", "peers", "read_only")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    GENESIS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    round: int
    chain_height: int
    head_hash: bytes
    genesis_digest: bytes
    view: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerState]
    read_only: bool
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., round: _Optional[int] = ..., chain_height: _Optional[int] = ..., head_hash: _Optional[bytes] = ..., genesis_digest: _Optional[bytes] = ..., view: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerState, _Mapping]]] = ..., read_only: _Optional[bool] = ...) -> None: ...

class PeerState(_message.Message):
    __slots__ = ("node_id", "address", "connected")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    connected: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., connected: _Optional[bool] = ...) -> None: ...

class PbftMessage(_message.Message):
    __slots__ = ("data", "auth")
    DATA_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    auth: Envelope
    def __init__(self, data: _Optional[bytes] = ..., auth: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class SubmitReceipt(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class UpdateReceipt(_message.Message):
    __slots__ = ("round", "client_id", "digest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    digest: bytes
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class FetchUpdateRequest(_message.Message):
    __slots__ = ("digest", "client_id", "issued_ms")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MS_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    client_id: str
    issued_ms: int
    def __init__(self, digest: _Optional[bytes] = ..., client_id: _Optional[str] = ..., issued_ms: _Optional[int] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("from_height",)
    FROM_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    from_height: int
    def __init__(self, from_height: _Optional[int] = ...) -> None: ...

class BlockBytes(_message.Message):
    __slots__ = ("height", "block")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    height: int
    block: bytes
    def __init__(self, height: _Optional[int] = ..., block: _Optional[bytes] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("round", "client_id")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class Attendance(_message.Message):
    __slots__ = ("client_id", "genesis_digest", "time_ms")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    GENESIS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    genesis_digest: bytes
    time_ms: int
    def __init__(self, client_id: _Optional[str] = ..., genesis_digest: _Optional[bytes] = ..., time_ms: _Optional[int] = ...) -> None: ...

class AttendRequest(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[Envelope]
    def __init__(self, clients: _Optional[_Iterable[_Union[Envelope, _Mapping]]] = ...) -> None: ...

class RoundNotice(_message.Message):
    __slots__ = ("round", "model_digest", "deadline_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_digest: bytes
    deadline_ms: int
    def __init__(self, round: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class RoundCall(_message.Message):
    __slots__ = ("client_id", "notice")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    notice: Envelope
    def __init__(self, client_id: _Optional[str] = ..., notice: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...
