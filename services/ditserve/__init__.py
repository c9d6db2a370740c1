"""ditserve: pipeline-parallel inference for Diffusion Transformers over gRPC.

Importing this package needs no torch: the server parts import it where they need it.
"""

__version__ = "0.1.0"
