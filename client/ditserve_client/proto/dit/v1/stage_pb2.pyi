from ditserve_client.proto.dit.v1 import tensor_pb2 as _tensor_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("microbatch_id", "tensors", "offset", "chunk", "request_ids", "payload_bytes", "origin", "shm_offer", "shm_slot", "cuda_offer", "cuda_handles")
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFER_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_FIELD_NUMBER: _ClassVar[int]
    CUDA_OFFER_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLES_FIELD_NUMBER: _ClassVar[int]
    microbatch_id: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    offset: int
    chunk: bytes
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    payload_bytes: int
    origin: int
    shm_offer: ShmOffer
    shm_slot: int
    cuda_offer: CudaOffer
    cuda_handles: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, microbatch_id: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., request_ids: _Optional[_Iterable[str]] = ..., payload_bytes: _Optional[int] = ..., origin: _Optional[int] = ..., shm_offer: _Optional[_Union[ShmOffer, _Mapping]] = ..., shm_slot: _Optional[int] = ..., cuda_offer: _Optional[_Union[CudaOffer, _Mapping]] = ..., cuda_handles: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CudaOffer(_message.Message):
    __slots__ = ("method", "probe", "token")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    method: str
    probe: bytes
    token: bytes
    def __init__(self, method: _Optional[str] = ..., probe: _Optional[bytes] = ..., token: _Optional[bytes] = ...) -> None: ...

class CudaAnswer(_message.Message):
    __slots__ = ("accepted", "reason", "device")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    device: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ShmOffer(_message.Message):
    __slots__ = ("segment", "token", "slot_bytes", "slots", "doorbell")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_FIELD_NUMBER: _ClassVar[int]
    segment: str
    token: bytes
    slot_bytes: int
    slots: int
    doorbell: bool
    def __init__(self, segment: _Optional[str] = ..., token: _Optional[bytes] = ..., slot_bytes: _Optional[int] = ..., slots: _Optional[int] = ..., doorbell: _Optional[bool] = ...) -> None: ...

class ShmAnswer(_message.Message):
    __slots__ = ("accepted", "reason", "doorbell", "doorbell_token")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    doorbell: str
    doorbell_token: bytes
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., doorbell: _Optional[str] = ..., doorbell_token: _Optional[bytes] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("microbatch_id", "tensors", "offset", "chunk", "error", "compute_seconds", "payload_bytes", "shm_answer", "shm_released_slot", "cuda_answer")
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SHM_RELEASED_SLOT_FIELD_NUMBER: _ClassVar[int]
    CUDA_ANSWER_FIELD_NUMBER: _ClassVar[int]
    microbatch_id: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    offset: int
    chunk: bytes
    error: _status_pb2.Status
    compute_seconds: _containers.RepeatedScalarFieldContainer[float]
    payload_bytes: int
    shm_answer: ShmAnswer
    shm_released_slot: int
    cuda_answer: CudaAnswer
    def __init__(self, microbatch_id: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., compute_seconds: _Optional[_Iterable[float]] = ..., payload_bytes: _Optional[int] = ..., shm_answer: _Optional[_Union[ShmAnswer, _Mapping]] = ..., shm_released_slot: _Optional[int] = ..., cuda_answer: _Optional[_Union[CudaAnswer, _Mapping]] = ...) -> None: ...

class DescribeChainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage_index", "num_stages", "block_start", "block_end", "depth", "model_name", "model_config_json", "weight_hash", "wire_datatype", "address", "device", "max_batch_size", "serving")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_HASH_FIELD_NUMBER: _ClassVar[int]
    WIRE_DATATYPE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    num_stages: int
    block_start: int
    block_end: int
    depth: int
    model_name: str
    model_config_json: str
    weight_hash: str
    wire_datatype: str
    address: str
    device: str
    max_batch_size: int
    serving: bool
    def __init__(self, stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., block_start: _Optional[int] = ..., block_end: _Optional[int] = ..., depth: _Optional[int] = ..., model_name: _Optional[str] = ..., model_config_json: _Optional[str] = ..., weight_hash: _Optional[str] = ..., wire_datatype: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., serving: _Optional[bool] = ...) -> None: ...

class DescribeChainResponse(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    def __init__(self, stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ...) -> None: ...
