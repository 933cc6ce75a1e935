from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_I32: _ClassVar[DType]

class FlashAttn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLASH_ATTN_AUTO: _ClassVar[FlashAttn]
    FLASH_ATTN_OFF: _ClassVar[FlashAttn]
    FLASH_ATTN_ON: _ClassVar[FlashAttn]
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_I32: DType
FLASH_ATTN_AUTO: FlashAttn
FLASH_ATTN_OFF: FlashAttn
FLASH_ATTN_ON: FlashAttn

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "description", "kind", "memory_total", "memory_free")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    kind: str
    memory_total: int
    memory_free: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., kind: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ...) -> None: ...

class LoadedRange(_message.Message):
    __slots__ = ("model_path", "architecture", "layer_start", "layer_end", "n_layer", "n_embd", "n_vocab", "weight_bytes", "model_hash", "source", "flash_attn", "cache_type_k", "cache_type_v")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    N_VOCAB_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FLASH_ATTN_FIELD_NUMBER: _ClassVar[int]
    CACHE_TYPE_K_FIELD_NUMBER: _ClassVar[int]
    CACHE_TYPE_V_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    architecture: str
    layer_start: int
    layer_end: int
    n_layer: int
    n_embd: int
    n_vocab: int
    weight_bytes: int
    model_hash: str
    source: str
    flash_attn: bool
    cache_type_k: str
    cache_type_v: str
    def __init__(self, model_path: _Optional[str] = ..., architecture: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., n_layer: _Optional[int] = ..., n_embd: _Optional[int] = ..., n_vocab: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., model_hash: _Optional[str] = ..., source: _Optional[str] = ..., flash_attn: _Optional[bool] = ..., cache_type_k: _Optional[str] = ..., cache_type_v: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "client")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client: str
    def __init__(self, protocol_version: _Optional[int] = ..., client: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "server_version", "device", "threads", "loaded", "open_sessions", "memory_cap", "memory_budget", "bandwidth", "matmul_flops", "cached", "bytes_received", "data_port", "data_token", "machine_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CAP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    MATMUL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_version: str
    device: Device
    threads: int
    loaded: LoadedRange
    open_sessions: int
    memory_cap: int
    memory_budget: int
    bandwidth: float
    matmul_flops: float
    cached: _containers.RepeatedCompositeFieldContainer[CachedSlice]
    bytes_received: int
    data_port: int
    data_token: str
    machine_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., server_version: _Optional[str] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., threads: _Optional[int] = ..., loaded: _Optional[_Union[LoadedRange, _Mapping]] = ..., open_sessions: _Optional[int] = ..., memory_cap: _Optional[int] = ..., memory_budget: _Optional[int] = ..., bandwidth: _Optional[float] = ..., matmul_flops: _Optional[float] = ..., cached: _Optional[_Iterable[_Union[CachedSlice, _Mapping]]] = ..., bytes_received: _Optional[int] = ..., data_port: _Optional[int] = ..., data_token: _Optional[str] = ..., machine_id: _Optional[str] = ...) -> None: ...

class CachedSlice(_message.Message):
    __slots__ = ("model_hash", "layer_start", "layer_end", "bytes")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    layer_start: int
    layer_end: int
    bytes: int
    def __init__(self, model_hash: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "open_sessions", "native_steps", "takes_turns", "prefix_entries", "prefix_bytes", "prefix_budget", "slice_cache_bytes", "slice_cache_budget", "weight_bytes", "session_bytes", "spare_bytes", "graph_bytes")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NATIVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TAKES_TURNS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SLICE_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLICE_CACHE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPARE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_BYTES_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    open_sessions: int
    native_steps: int
    takes_turns: bool
    prefix_entries: int
    prefix_bytes: int
    prefix_budget: int
    slice_cache_bytes: int
    slice_cache_budget: int
    weight_bytes: int
    session_bytes: int
    spare_bytes: int
    graph_bytes: int
    def __init__(self, serving: _Optional[bool] = ..., open_sessions: _Optional[int] = ..., native_steps: _Optional[int] = ..., takes_turns: _Optional[bool] = ..., prefix_entries: _Optional[int] = ..., prefix_bytes: _Optional[int] = ..., prefix_budget: _Optional[int] = ..., slice_cache_bytes: _Optional[int] = ..., slice_cache_budget: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., session_bytes: _Optional[int] = ..., spare_bytes: _Optional[int] = ..., graph_bytes: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_path", "layer_start", "layer_end", "model_hash", "flash_attn", "cache_type_k", "cache_type_v", "share_host", "slice_digest")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    FLASH_ATTN_FIELD_NUMBER: _ClassVar[int]
    CACHE_TYPE_K_FIELD_NUMBER: _ClassVar[int]
    CACHE_TYPE_V_FIELD_NUMBER: _ClassVar[int]
    SHARE_HOST_FIELD_NUMBER: _ClassVar[int]
    SLICE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    layer_start: int
    layer_end: int
    model_hash: str
    flash_attn: FlashAttn
    cache_type_k: str
    cache_type_v: str
    share_host: str
    slice_digest: str
    def __init__(self, model_path: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., model_hash: _Optional[str] = ..., flash_attn: _Optional[_Union[FlashAttn, str]] = ..., cache_type_k: _Optional[str] = ..., cache_type_v: _Optional[str] = ..., share_host: _Optional[str] = ..., slice_digest: _Optional[str] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("loaded", "seconds", "needs_weights", "source")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    loaded: LoadedRange
    seconds: float
    needs_weights: bool
    source: str
    def __init__(self, loaded: _Optional[_Union[LoadedRange, _Mapping]] = ..., seconds: _Optional[float] = ..., needs_weights: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class SliceTensorInfo(_message.Message):
    __slots__ = ("name", "offset", "n_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    N_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    n_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., n_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SliceHeader(_message.Message):
    __slots__ = ("model_hash", "layer_start", "layer_end", "header", "data_size", "tensors")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    layer_start: int
    layer_end: int
    header: bytes
    data_size: int
    tensors: _containers.RepeatedCompositeFieldContainer[SliceTensorInfo]
    def __init__(self, model_hash: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., header: _Optional[bytes] = ..., data_size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[SliceTensorInfo, _Mapping]]] = ...) -> None: ...

class TensorData(_message.Message):
    __slots__ = ("tensor", "offset", "data", "crc32")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    data: bytes
    crc32: int
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class SliceChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SliceHeader
    data: TensorData
    def __init__(self, header: _Optional[_Union[SliceHeader, _Mapping]] = ..., data: _Optional[_Union[TensorData, _Mapping]] = ...) -> None: ...

class UploadTicket(_message.Message):
    __slots__ = ("port", "token")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class PushSliceReply(_message.Message):
    __slots__ = ("tensor_bytes", "seconds")
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tensor_bytes: int
    seconds: float
    def __init__(self, tensor_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("n_ctx", "prefix_session", "prefix_rows", "prefix_take")
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SESSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ROWS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TAKE_FIELD_NUMBER: _ClassVar[int]
    n_ctx: int
    prefix_session: str
    prefix_rows: int
    prefix_take: bool
    def __init__(self, n_ctx: _Optional[int] = ..., prefix_session: _Optional[str] = ..., prefix_rows: _Optional[int] = ..., prefix_take: _Optional[bool] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "n_ctx", "cache_bytes", "evicted")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    n_ctx: int
    cache_bytes: int
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., n_ctx: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "start_pos", "input", "all_logits", "output_dtype", "logits_top_k")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ALL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_TOP_K_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_pos: int
    input: Tensor
    all_logits: bool
    output_dtype: DType
    logits_top_k: int
    def __init__(self, session_id: _Optional[str] = ..., start_pos: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., all_logits: _Optional[bool] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., logits_top_k: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("output", "compute_seconds", "token_ids")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    compute_seconds: float
    token_ids: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "keep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep: bool
    def __init__(self, session_id: _Optional[str] = ..., keep: _Optional[bool] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("kept", "evicted")
    KEPT_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    kept: bool
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kept: _Optional[bool] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("data_address", "data_token")
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    data_address: str
    data_token: str
    def __init__(self, data_address: _Optional[str] = ..., data_token: _Optional[str] = ...) -> None: ...

class PeersRequest(_message.Message):
    __slots__ = ("link", "peers")
    LINK_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    link: int
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, link: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class PeersReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
