"""Stage chains: the interface the coordinator drives, in-process and remote.

base.py (the StageChain interface and its ChainOutput) ← local.py (StageRunners in this
process) and remote.py (a relay chain of stage workers, through stage 0); handshake.py
checks a chain end to end before the coordinator serves it. The chain depends on the
stage package (its runner and its client), never the other way round.
"""

from .base import ChainOutput, StageChain
from .handshake import check_chain
from .local import LocalChain
from .remote import RemoteChain

__all__ = ["ChainOutput", "LocalChain", "RemoteChain", "StageChain", "check_chain"]
