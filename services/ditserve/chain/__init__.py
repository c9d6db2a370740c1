"""Stage chains: the interface the coordinator drives, in-process and remote.

`LocalChain` (local.py) and `RemoteChain` (remote.py) import torch and grpc; import them
from their modules, or lazily through this package (`from ditserve.chain import
RemoteChain`)."""

from .base import ChainError, ErrorCode, MicrobatchTiming, StageChain, StageDescription
from .handshake import check_chain

__all__ = ["ChainError", "ErrorCode", "LocalChain", "MicrobatchTiming", "RemoteChain",
           "StageChain", "StageDescription", "check_chain"]


def __getattr__(name: str):
    if name == "LocalChain":
        from .local import LocalChain
        return LocalChain
    if name == "RemoteChain":
        from .remote import RemoteChain
        return RemoteChain
    raise AttributeError(name)
