from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Deliver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLY: _ClassVar[Deliver]
    RESULTS: _ClassVar[Deliver]
REPLY: Deliver
RESULTS: Deliver

class CapabilitiesRequest(_message.Message):
    __slots__ = ("revoked_serials",)
    REVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    revoked_serials: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revoked_serials: _Optional[_Iterable[str]] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("protocol", "name", "backend", "memory_budget_bytes", "memory_used_bytes", "gflops", "wire_dtypes", "model_files")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    name: str
    backend: str
    memory_budget_bytes: int
    memory_used_bytes: int
    gflops: float
    wire_dtypes: _containers.RepeatedScalarFieldContainer[str]
    model_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol: _Optional[str] = ..., name: _Optional[str] = ..., backend: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., gflops: _Optional[float] = ..., wire_dtypes: _Optional[_Iterable[str]] = ..., model_files: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "ggml_type", "shape", "sha256", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GGML_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ggml_type: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., ggml_type: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "file_sha256")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    file_sha256: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., file_sha256: _Optional[str] = ...) -> None: ...

class TensorHashes(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data", "last")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    last: bool
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_id", "config_json", "layer_start", "layer_stop", "manifest", "owner", "generation")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_json: str
    layer_start: int
    layer_stop: int
    manifest: Manifest
    owner: str
    generation: int
    def __init__(self, model_id: _Optional[str] = ..., config_json: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., owner: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("address", "model_id", "layer_start", "layer_stop", "adapter")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_id: str
    layer_start: int
    layer_stop: int
    adapter: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, address: _Optional[str] = ..., model_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., adapter: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("session_id", "step", "rows", "cols", "dtype", "data", "hop", "next", "deliver", "compute_us", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    rows: int
    cols: int
    dtype: str
    data: bytes
    hop: Hop
    next: _containers.RepeatedCompositeFieldContainer[Hop]
    deliver: Deliver
    compute_us: _containers.RepeatedScalarFieldContainer[int]
    position: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., hop: _Optional[_Union[Hop, _Mapping]] = ..., next: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., deliver: _Optional[_Union[Deliver, str]] = ..., compute_us: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "keep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep: int
    def __init__(self, session_id: _Optional[str] = ..., keep: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("session_id", "kept_session_id", "positions", "hop")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEPT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kept_session_id: str
    positions: int
    hop: Hop
    def __init__(self, session_id: _Optional[str] = ..., kept_session_id: _Optional[str] = ..., positions: _Optional[int] = ..., hop: _Optional[_Union[Hop, _Mapping]] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("resumed", "reason")
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    resumed: bool
    reason: str
    def __init__(self, resumed: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("padding",)
    PADDING_FIELD_NUMBER: _ClassVar[int]
    padding: bytes
    def __init__(self, padding: _Optional[bytes] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "sessions", "memory_used_bytes")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    sessions: int
    memory_used_bytes: int
    def __init__(self, serving: _Optional[bool] = ..., sessions: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("statement", "signature", "certificate")
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    signature: str
    certificate: str
    def __init__(self, statement: _Optional[bytes] = ..., signature: _Optional[str] = ..., certificate: _Optional[str] = ...) -> None: ...
