"""Whether a gateway serves: for launchers that wait on it (stdlib only, no server extras).

    is_serving("127.0.0.1:8080")   # GET /healthz answered 200: the coordinator behind is SERVING
    answers("127.0.0.1:8080")      # it answered at all (a liveness probe)
"""

from __future__ import annotations

import urllib.error
import urllib.request


def is_serving(address: str, timeout: float = 1.0) -> bool:
    """Whether `GET http://ADDRESS/healthz` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def answers(address: str, timeout: float = 1.0) -> bool:
    """Whether `GET http://ADDRESS/healthz` gets any HTTP answer (503 too) within `timeout`."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
