"""The HTTP/JSON gateway: curl and a browser in front of the coordinator's gRPC API.

    client --HTTP/JSON, SSE--> gateway --gRPC (ditserve_client.AsyncClient)--> coordinator

Built on the torch-free client SDK and Starlette under uvicorn (the standard ASGI stack:
one asyncio loop shared with grpc.aio, streaming responses for Server-Sent Events). Serves
`GET /v1/model`, `POST /v1/generate` (one JSON reply, or an event stream with
`Accept: text/event-stream`), `GET /healthz`, `GET /openapi.json` and the live page at `/`.
"""

from .config import GatewayConfig

__all__ = ["GatewayConfig"]
