"""ditserve's client SDK: grpcio and protobuf only, no torch.

    from ditserve_client import Client
    with Client("127.0.0.1:50050") as client:
        result = client.generate_result(["red circle"], seed=0, sampler="ddim")  # demo model
        result.images[0].save("circle.png")

Options left out (sampler, steps, guidance, ...) take the server's defaults; a call that
fails UNAVAILABLE before the server answered is retried by the channel's retry policy.
"""

from .aio import AsyncClient
from .client import Client
from .errors import DitserveError
from .events import Accepted, EncodedImage, Event, Progress, Result, Timings, TypedArray
from .labels import ClassNames, UnknownClassError, imagenet_class_names
from .model_info import ModelInfo, StageSummary
from .npy import write_npy

__all__ = ["Accepted", "AsyncClient", "ClassNames", "Client", "DitserveError", "EncodedImage",
           "Event", "ModelInfo", "Progress", "Result", "StageSummary", "Timings", "TypedArray",
           "UnknownClassError", "imagenet_class_names", "write_npy"]
