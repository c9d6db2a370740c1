"""Stage chains: the interface the coordinator drives, in-process and remote."""

from .base import ChainError, ErrorCode, MicrobatchTiming, StageChain, StageDescription

__all__ = ["ChainError", "ErrorCode", "MicrobatchTiming", "StageChain", "StageDescription"]
