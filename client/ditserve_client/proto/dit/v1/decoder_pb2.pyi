from ditserve_client.proto.dit.v1 import image_pb2 as _image_pb2
from ditserve_client.proto.dit.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("latents", "format", "quality", "class_labels", "request_id")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    format: _image_pb2.ImageFormat
    quality: int
    class_labels: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., class_labels: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images", "decode_seconds")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_image_pb2.Image]
    decode_seconds: float
    def __init__(self, images: _Optional[_Iterable[_Union[_image_pb2.Image, _Mapping]]] = ..., decode_seconds: _Optional[float] = ...) -> None: ...
