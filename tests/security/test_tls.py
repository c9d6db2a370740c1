"""TLS and mTLS on a real ditserve server (the shared lifecycle, in process) with real
certificates: who gets through the handshake, who gets past the identity check, and
certificate rotation without a restart."""

from __future__ import annotations

import dataclasses
import datetime
import stat

import grpc
import pytest
from ditserve.launcher.pki import issue
from ditserve.security.service import ServiceSecurity
from ditserve.security.tls import Dialer, PemFiles, server_credentials
from ditserve.stage.servicer import StageServicer
from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc
from grpc_health.v1 import health_pb2

from .helpers import OWN_CONNECTION, Pki, health, replace_atomically, rpc_code, run, serving

SERVING = health_pb2.HealthCheckResponse.SERVING


def _stage(server: grpc.aio.Server) -> None:
    """A stage servicer without weights: a call that gets through answers UNAVAILABLE
    ("loading its weights"), one refused by security answers its own code."""
    stage_pb2_grpc.add_StageServiceServicer_to_server(StageServicer(None), server)


def _stage1(pki: Pki, **changes) -> ServiceSecurity:
    return ServiceSecurity.internal(pki.security("stage-1", **changes), "stage-1", ["stage-0"])


async def _describe(target: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(target, credentials, OWN_CONNECTION) as channel:
        stub = stage_pb2_grpc.StageServiceStub(channel)
        return await rpc_code(lambda: stub.DescribeChain(stage_pb2.DescribeChainRequest(),
                                                          timeout=10))


def test_plaintext_client_is_refused_by_a_tls_server(tmp_path):
    pki = Pki(tmp_path)

    async def main():
        async with serving(_stage1(pki), _stage) as server:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health(f"127.0.0.1:{server.port}", None, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    run(main())


def test_peers_of_another_ca_are_refused_both_ways(tmp_path):
    pki, other = Pki(tmp_path / "pipeline"), Pki(tmp_path / "other")
    other.leaf("stage-0")

    async def main():
        async with serving(_stage1(pki), _stage) as server:
            target = f"127.0.0.1:{server.port}"
            # The client presents a certificate of another CA: the stage refuses it.
            assert await _describe(target, other.client_credentials(
                "stage-0", ca=pki.ca_path)) == grpc.StatusCode.UNAVAILABLE
            # The client trusts another CA: it refuses the stage's certificate.
            pki.leaf("stage-0")
            root = other.ca_path.read_bytes()
            mine = pki.folder / "stage-0"
            credentials = grpc.ssl_channel_credentials(
                root, mine.with_suffix(".key").read_bytes(), mine.with_suffix(".crt").read_bytes())
            assert await _describe(target, credentials) == grpc.StatusCode.UNAVAILABLE
            # The same certificate and the pipeline's CA: through, to the servicer.
            assert await _describe(target, pki.client_credentials("stage-0")) == \
                grpc.StatusCode.UNAVAILABLE  # "loading its weights", i.e. admitted
            assert await health(target, pki.client_credentials("stage-0")) == SERVING
    run(main())


def test_stage_refuses_a_peer_without_a_client_certificate(tmp_path):
    pki = Pki(tmp_path)

    async def main():
        async with serving(_stage1(pki), _stage) as server:
            target = f"127.0.0.1:{server.port}"
            assert await _describe(target, pki.client_credentials()) == \
                grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError):
                await health(target, pki.client_credentials(), timeout=5)
    run(main())


def test_stage_refuses_an_expired_client_certificate(tmp_path):
    pki = Pki(tmp_path)
    pki.expired_leaf("stage-0")

    async def main():
        async with serving(_stage1(pki), _stage) as server:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health(f"127.0.0.1:{server.port}",
                             pki.client_credentials("stage-0-expired"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    run(main())


def test_client_refuses_an_expired_server_certificate(tmp_path):
    """A server with an expired certificate (grpc's own credentials, since ditserve refuses
    to start with one) is refused by the client's handshake."""
    pki = Pki(tmp_path)
    cert, key = pki.expired_leaf("stage-1")

    async def main():
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())]))
        from grpc_health.v1 import health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        await server.start()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health(f"127.0.0.1:{port}", pki.client_credentials(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)
    run(main())


@pytest.mark.parametrize("fault", ["expired", "foreign key", "missing", "not pem"])
def test_a_server_refuses_to_start_with_unusable_files(tmp_path, fault):
    pki = Pki(tmp_path)
    security = _stage1(pki)
    files = security.files()
    if fault == "expired":
        expired_cert, _ = pki.expired_leaf("stage-1")
        replace_atomically(files.cert, expired_cert.read_bytes())
        replace_atomically(files.key, (pki.folder / "stage-1-expired.key").read_bytes())
    elif fault == "foreign key":
        _, other_key = pki.leaf("stage-2")
        replace_atomically(files.key, other_key.read_bytes())
    elif fault == "missing":
        files.key.unlink()
    else:
        replace_atomically(files.ca, b"not a certificate\n")
    expected = {"expired": "expired on", "foreign key": "does not belong",
                "missing": "cannot read the TLS key", "not pem": "no PEM certificate"}[fault]
    with pytest.raises(ValueError, match=expected):
        server_credentials(files, "stage-1", require_client_certificate=True)


def test_only_the_previous_hop_may_call_a_stage(tmp_path):
    pki = Pki(tmp_path)
    for name in ("stage-0", "coordinator"):
        pki.leaf(name)

    async def main():
        async with serving(_stage1(pki), _stage) as server:
            target = f"127.0.0.1:{server.port}"
            assert await _describe(target, pki.client_credentials("coordinator")) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert await _describe(target, pki.client_credentials("stage-0")) == \
                grpc.StatusCode.UNAVAILABLE  # admitted: the stage has no weights
            # Forward (a stream) is guarded alike.
            async with grpc.aio.secure_channel(target, pki.client_credentials("coordinator")) \
                    as channel:
                call = stage_pb2_grpc.StageServiceStub(channel).Forward(iter(()))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in call:
                        pass
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "stage-1 accepts calls only from spiffe://ditserve.local/stage-0" in \
                    refused.value.details()
            # Health stays open to any certificate of the CA (the probes' view).
            assert await health(target, pki.client_credentials("coordinator")) == SERVING
        async with serving(_stage1(pki, verify_peer_identity=False), _stage) as server:
            assert await _describe(f"127.0.0.1:{server.port}",
                                   pki.client_credentials("coordinator")) == \
                grpc.StatusCode.UNAVAILABLE
    run(main())


def test_rotated_certificates_serve_new_connections_while_old_ones_carry_on(tmp_path):
    """CA roll-over: the stage's files change to a certificate of a new CA (the CA file now
    bundles both). The connection opened before keeps working; new connections get the new
    certificate: a client trusting only the new CA gets in, one trusting only the old not."""
    old, new = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    old.leaf("stage-0")
    security = _stage1(old)
    files = security.files()
    old_ca_only = tmp_path / "old-ca.crt"  # the stage's CA file becomes a bundle
    old_ca_only.write_bytes(old.ca.cert_pem)

    async def main():
        async with serving(security, _stage) as server:
            target = f"127.0.0.1:{server.port}"
            async with grpc.aio.secure_channel(target, old.client_credentials("stage-0")) \
                    as before:
                stub = stage_pb2_grpc.StageServiceStub(before)
                request = stage_pb2.DescribeChainRequest()
                assert await rpc_code(lambda: stub.DescribeChain(request, timeout=10)) == \
                    grpc.StatusCode.UNAVAILABLE  # admitted

                # A half-done rotation (new key, old certificate) changes nothing.
                new_cert, new_key = new.leaf("stage-1")
                replace_atomically(files.key, new_key.read_bytes())
                assert await health(target, old.client_credentials("stage-0")) == SERVING
                # The whole rotation.
                replace_atomically(files.ca, old.ca.cert_pem + new.ca.cert_pem)
                replace_atomically(files.cert, new_cert.read_bytes())

                assert await rpc_code(lambda: stub.DescribeChain(request, timeout=10)) == \
                    grpc.StatusCode.UNAVAILABLE  # the old connection still serves calls
                only_new = old.client_credentials("stage-0", ca=new.ca_path)
                assert await health(target, only_new) == SERVING
                with pytest.raises(grpc.aio.AioRpcError):
                    await health(target, old.client_credentials("stage-0", ca=old_ca_only),
                                 timeout=5)
    run(main())


def test_dialer_redials_with_rotated_client_certificates(tmp_path):
    """A channel keeps the certificate it was made with; after a rotation `refresh` gives a
    channel with the new one. The stage here trusts only the new CA."""
    old, new = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    new.leaf("stage-0")
    old.leaf("coordinator")
    trust_new_only = _stage1(new)
    mine = PemFiles(new.ca_path, old.folder / "coordinator.crt", old.folder / "coordinator.key")

    async def main():
        async with serving(trust_new_only, _stage) as server:
            target = f"127.0.0.1:{server.port}"
            dialer = Dialer(mine)
            channel = dialer.channel(target, [])
            assert dialer.refresh(target, []) is None  # nothing changed
            with pytest.raises(grpc.aio.AioRpcError):
                await health_on(channel, timeout=5)
            rotated = issue(new.ca, "stage-0", uris=["spiffe://ditserve.local/stage-0"])
            replace_atomically(mine.key, rotated.key_pem)
            replace_atomically(mine.cert, rotated.cert_pem)
            fresh = dialer.refresh(target, [])
            assert fresh is not None
            assert await health_on(fresh) == SERVING
            await channel.close()
            await fresh.close()
    run(main())


async def health_on(channel: grpc.aio.Channel, timeout: float = 10.0) -> int:
    from grpc_health.v1 import health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=timeout)
    return reply.status


def test_certificates_of_the_throwaway_pki_name_their_service(tmp_path):
    from cryptography import x509
    from ditserve.launcher.pki import make_run_pki

    made = make_run_pki(tmp_path, ["coordinator", "stage-0"])
    cert = x509.load_pem_x509_certificate((tmp_path / "tls/stage-0.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "spiffe://ditserve.local/stage-0" in names.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert (tmp_path / "tls/stage-0.key").stat().st_mode & 0o077 == 0
    assert made.token not in (tmp_path / "tls/tokens").read_text()
    assert made.security.tls and "{service}" in made.security.cert


def test_secure_local_config_gives_every_service_a_certificate_and_hides_the_token(tmp_path):
    from ditserve.config import local_config
    from ditserve.launcher.pki import secure_local_config

    plain = local_config(2, 56000)
    config, made = secure_local_config(plain, tmp_path / "run")
    assert dataclasses.replace(config, security=plain.security) == plain
    for service in ("coordinator", "decoder", "stage-0", "stage-1"):
        files = PemFiles.of(config.security.ca, config.security.cert, config.security.key, service)
        files.read()  # present, matching, unexpired
        assert files.cert.is_absolute()
    hint = made.client_hint(config.coordinator.address)
    assert made.token not in hint and str(made.ca_path) in hint
    assert made.token_path.read_text().strip() == made.token
    assert stat.S_IMODE(made.token_path.stat().st_mode) == 0o600

    async def main():  # the launcher's health check reaches an mTLS-only stage
        security = ServiceSecurity.internal(config.security, "stage-1", ["stage-0"])
        async with serving(security, _stage) as server:
            assert await health(f"127.0.0.1:{server.port}", made.health_credentials()) == SERVING
    run(main())


def test_extra_hosts_become_sans_and_wildcards_do_not(tmp_path):
    from cryptography import x509
    from ditserve.launcher.pki import make_run_pki

    make_run_pki(tmp_path, ["stage-0"], hosts=["10.1.2.3", "gpu-box.lan", "0.0.0.0", "[::]"])
    cert = x509.load_pem_x509_certificate((tmp_path / "tls/stage-0.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "gpu-box.lan"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "10.1.2.3"]


class _OpenStream(stage_pb2_grpc.StageServiceServicer):
    """Accepts a Forward stream and keeps it open (a next hop that is up)."""

    async def Forward(self, request_iterator, context):
        await context.send_initial_metadata(())
        async for _ in request_iterator:
            pass
        return
        yield


def test_stage_client_reconnects_with_rotated_certificates(tmp_path):
    """The hop's stream cannot open while the client's certificate is of the old CA; after
    the client's files rotate, its next reconnection dials with them and the stream opens."""
    from ditserve.stage.client import StageClient

    old, new = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    cert, key = old.leaf("stage-0")
    mine = PemFiles(new.ca_path, cert, key)

    def register(server: grpc.aio.Server) -> None:
        stage_pb2_grpc.add_StageServiceServicer_to_server(_OpenStream(), server)

    async def main():
        async with serving(_stage1(new), register) as server:
            client = StageClient(f"127.0.0.1:{server.port}", peer="stage-1", dialer=Dialer(mine))
            try:
                with pytest.raises(TimeoutError):
                    await client.wait_connected(3)
                rotated = issue(new.ca, "stage-0", uris=["spiffe://ditserve.local/stage-0"])
                replace_atomically(key, rotated.key_pem)
                replace_atomically(cert, rotated.cert_pem)
                await client.wait_connected(30)
            finally:
                await client.close()
    run(main())
