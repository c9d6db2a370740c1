"""The public API's bearer tokens, the probes' health port and the plaintext guard, on a
real ditserve server (shared lifecycle, in process) with a stand-in CoordinatorService."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from ditserve.config import SecurityConfig
from ditserve.security.service import ServiceSecurity, is_loopback
from ditserve.security.tokens import hash_token, new_token
from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .helpers import OWN_CONNECTION, Pki, health, replace_atomically, rpc_code, run, serving

COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


class StandIn(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Answers at once: a call that gets past the token check succeeds."""

    async def GetModelInfo(self, request, context):
        return coordinator_pb2.GetModelInfoResponse(model_name="stand-in")

    async def Generate(self, request, context):
        yield coordinator_pb2.GenerateResponse()


def _register(server: grpc.aio.Server) -> None:
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(StandIn(), server)


@pytest.fixture
def tokens(tmp_path):
    """A tokens file admitting one fresh token: (path, token)."""
    token = new_token()
    path = tmp_path / "tokens"
    path.write_text(f"# admitted\n{hash_token(token)} alice\n")
    return path, token


def _public(pki: Pki, tokens_path, **changes) -> ServiceSecurity:
    return ServiceSecurity.public_api(pki.security("coordinator", tokens=str(tokens_path),
                                                   **changes))


class Calls:
    """Both kinds of public call (unary and server-streaming) with a given token."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials):
        self.target, self.credentials = target, credentials

    async def codes(self, token: str | None) -> set[grpc.StatusCode]:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        return {await self.code("info", metadata), await self.code("generate", metadata)}

    async def code(self, which: str, metadata, details: list | None = None) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(self.target, self.credentials, OWN_CONNECTION) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            try:
                if which == "info":
                    await stub.GetModelInfo(coordinator_pb2.GetModelInfoRequest(),
                                            metadata=metadata, timeout=10)
                else:
                    async for _ in stub.Generate(coordinator_pb2.GenerateRequest(),
                                                 metadata=metadata, timeout=10):
                        pass
            except grpc.aio.AioRpcError as error:
                if details is not None:
                    details.append(error.details())
                return error.code()
        return grpc.StatusCode.OK


def test_tokens_missing_wrong_and_right(tmp_path, tokens, caplog):
    pki, (path, token) = Pki(tmp_path / "pki"), tokens
    wrong = new_token()
    caplog.set_level(logging.DEBUG, logger="ditserve")

    async def main():
        async with serving(_public(pki, path), _register, (COORDINATOR,)) as server:
            calls = Calls(f"127.0.0.1:{server.port}", pki.client_credentials())
            assert await calls.codes(None) == {grpc.StatusCode.UNAUTHENTICATED}
            assert await calls.codes(wrong) == {grpc.StatusCode.UNAUTHENTICATED}
            assert await calls.codes("") == {grpc.StatusCode.UNAUTHENTICATED}
            assert await calls.codes(token) == {grpc.StatusCode.OK}
            basic = (("authorization", f"Basic {token}"),)
            details: list[str] = []
            assert await calls.code("info", basic, details) == grpc.StatusCode.UNAUTHENTICATED
            assert await calls.code("info", (("authorization", f"Bearer {wrong}"),),
                                    details) == grpc.StatusCode.UNAUTHENTICATED
            return details

    details = run(main())
    assert details == ["malformed authorization metadata: expected one 'Bearer TOKEN'",
                       "unknown bearer token"]
    # Neither the admitted token nor the refused one appears in the logs; the admitted
    # call is logged by the name of its entry.
    assert token not in caplog.text and wrong not in caplog.text
    assert "token_name" in caplog.text or any(
        getattr(r, "fields", {}).get("token_name") == "alice" for r in caplog.records)
    refused = [r for r in caplog.records if r.getMessage() == "call_refused"]
    assert {r.fields["reason"] for r in refused} >= {"unknown bearer token"}


def test_rotated_tokens_file_takes_effect_without_restart(tmp_path, tokens):
    pki, (path, old_token) = Pki(tmp_path / "pki"), tokens
    new = new_token()

    async def main():
        async with serving(_public(pki, path), _register, (COORDINATOR,)) as server:
            calls = Calls(f"127.0.0.1:{server.port}", pki.client_credentials())
            assert await calls.codes(old_token) == {grpc.StatusCode.OK}
            replace_atomically(path, f"{hash_token(new)} bob\n".encode())
            assert await calls.codes(new) == {grpc.StatusCode.OK}
            assert await calls.codes(old_token) == {grpc.StatusCode.UNAUTHENTICATED}
            # A broken new version (a raw token pasted by mistake) keeps the current one.
            replace_atomically(path, f"{new_token()}\n".encode())
            assert await calls.codes(new) == {grpc.StatusCode.OK}
    run(main())


def test_reflection_needs_a_token_health_does_not(tmp_path, tokens):
    pki, (path, token) = Pki(tmp_path / "pki"), tokens

    async def list_services(target: str, metadata) -> grpc.StatusCode:
        # The call's own final status: a refused stream may close before the client's write
        # goes out, and that write's failure (INTERNAL on a loaded machine) is not the answer.
        async with grpc.aio.secure_channel(target, pki.client_credentials(), OWN_CONNECTION) as ch:
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                metadata=metadata, timeout=10)
            try:
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                await call.done_writing()
                await _drain(call)
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
            return await call.code()

    async def main():
        async with serving(_public(pki, path), _register, (COORDINATOR,)) as server:
            target = f"127.0.0.1:{server.port}"
            assert await list_services(target, ()) == grpc.StatusCode.UNAUTHENTICATED
            assert await list_services(target, (("authorization", f"Bearer {token}"),)) == \
                grpc.StatusCode.OK
            assert await health(target, pki.client_credentials()) == \
                health_pb2.HealthCheckResponse.SERVING
    run(main())


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_health_port_answers_health_only_in_plaintext(tmp_path, tokens, free_port):
    pki, (path, token) = Pki(tmp_path / "pki"), tokens
    health_address = f"127.0.0.1:{free_port()}"

    async def main():
        security = _public(pki, path, health_listen=health_address)
        async with serving(security, _register, (COORDINATOR,)) as server:
            assert await health(health_address, None) == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(health_address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                code = await rpc_code(lambda: stub.GetModelInfo(
                    coordinator_pb2.GetModelInfoRequest(),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=10))
                assert code == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there
            await server.set_serving(False)  # the probes see what the main port says
            assert await health(health_address, None) == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError):  # stopped with the service
            await health(health_address, None, timeout=2)
    run(main())


def test_plaintext_off_loopback_needs_an_explicit_flag(caplog):
    refusing = ServiceSecurity.internal(SecurityConfig(), "decoder", ["coordinator"])

    async def bind(security: ServiceSecurity, listen: str) -> int:
        server = grpc.aio.server()
        try:
            return security.bind(server, listen)
        finally:
            await server.stop(0)

    with pytest.raises(ValueError, match=r"refusing to serve decoder in plaintext on 0\.0\.0\.0:0"):
        run(bind(refusing, "0.0.0.0:0"))
    assert run(bind(refusing, "127.0.0.1:0")) > 0  # loopback: fine, no warning
    assert "plaintext_off_loopback" not in caplog.text
    allowing = ServiceSecurity.internal(SecurityConfig(allow_plaintext_off_loopback=True),
                                        "decoder", ["coordinator"])
    assert run(bind(allowing, "0.0.0.0:0")) > 0
    warnings = [r for r in caplog.records if r.getMessage() == "plaintext_off_loopback"]
    assert warnings and warnings[0].levelno == logging.WARNING


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:1", True), ("127.3.4.5:1", True), ("[::1]:1", True), ("localhost:1", True),
    ("[::]:1", False), ("0.0.0.0:1", False), ("10.0.0.7:1", False), ("dit-stage-0:1", False),
    (":1", False)])
def test_what_counts_as_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_new_tokens_never_start_with_a_dash():
    """`--token -abc` is a missing value to argparse: one token in 64 used to start so (2000
    draws without one, by chance: (63/64)^2000 ~ 2e-14)."""
    tokens = [new_token() for _ in range(2000)]
    assert not any(token.startswith("-") for token in tokens)
    assert len(set(tokens)) == len(tokens) and all(len(token) == 43 for token in tokens)
