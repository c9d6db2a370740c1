"""The coordinator's start-up handshake: a chain still starting is asked again, a chain
that can never work fails at once; decided on the stages' fields and the status code,
never on the words of a message."""

from __future__ import annotations

import asyncio

import pytest
from ditserve.common.status import ServiceError, StatusCode
from ditserve.coordinator import server
from ditserve.coordinator.server import StartupError, handshake
from ditserve.stage.runner import StageDescription


def _stages(serving=(True, True), weight_hash="abc") -> list[StageDescription]:
    return [StageDescription(stage_index=i, num_stages=2, block_start=2 * i,
                             block_end=2 * i + 2, depth=4, model_name="DiT-Tiny/2",
                             model_config_json="{}", weight_hash="abc" if i == 0 else weight_hash,
                             wire_dtype="FP32", serving=up)
            for i, up in enumerate(serving)]


class ScriptedChain:
    """Answers `describe` with the next scripted reply (a list of stages or an error)."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = 0

    async def describe(self):
        self.calls += 1
        reply = self.replies[min(self.calls, len(self.replies)) - 1]
        if isinstance(reply, ServiceError):
            raise reply
        return reply


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(server, "HANDSHAKE_RETRY_SECONDS", 0.0)


def test_a_chain_still_starting_is_asked_again_until_it_serves():
    chain = ScriptedChain(ServiceError(StatusCode.UNAVAILABLE, "stage-0 unreachable"),
                          _stages(serving=(True, False)), _stages())
    stages = asyncio.run(handshake(chain, "fp32", timeout=10))
    assert chain.calls == 3 and all(s.serving for s in stages)


def test_a_mismatch_fails_at_once_even_while_a_stage_is_loading():
    chain = ScriptedChain(_stages(serving=(True, False), weight_hash="xyz"))
    with pytest.raises(StartupError, match="stage 1: weight hash 'xyz' differs"):
        asyncio.run(handshake(chain, "fp32", timeout=10))
    assert chain.calls == 1


def test_a_stage_that_never_serves_fails_after_the_timeout_naming_it():
    chain = ScriptedChain(_stages(serving=(True, False)))
    with pytest.raises(StartupError, match="stage 1: is not serving"):
        asyncio.run(handshake(chain, "fp32", timeout=0.05))
    assert chain.calls > 1


def test_a_not_serving_message_from_elsewhere_is_not_taken_for_starting():
    """An error whose words say "not serving" but whose code is final is not retried."""
    chain = ScriptedChain(ServiceError(StatusCode.FAILED_PRECONDITION, "x is not serving"),
                          _stages())
    with pytest.raises(StartupError, match="x is not serving"):
        asyncio.run(handshake(chain, "fp32", timeout=10))
    assert chain.calls == 1

