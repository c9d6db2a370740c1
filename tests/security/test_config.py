"""The pipeline config's `security` section and the service commands' flags."""

from __future__ import annotations

import argparse

import pytest
from ditserve.config import ConfigError, SecurityConfig, config_from_dict
from ditserve.security.flags import add_arguments, security_from
from ditserve.security.tls import PemFiles

STAGES = [{"address": "127.0.0.1:1"}]


def test_section_is_typed_and_validated():
    config = config_from_dict({"stages": STAGES, "security": {
        "tls": True, "ca": "/tls/ca.crt", "cert": "/tls/{service}.crt", "key": "/tls/{service}.key",
        "tokens": "/tokens/tokens", "health_listen": "[::]:50052"}})
    assert config.security.tls and config.security.verify_peer_identity
    assert PemFiles.of(config.security.ca, config.security.cert, config.security.key,
                       "stage-1").cert.name == "stage-1.crt"
    assert config_from_dict({"stages": STAGES}).security == SecurityConfig()


@pytest.mark.parametrize(("section", "message"), [
    ({"tls": True, "ca": "ca.crt"}, "security.tls needs security.cert"),
    ({"tls": "false"}, "security.tls must be a bool"),
    ({"tlss": True}, "unknown config key security.tlss"),
    ({"trust_domain": "a/b"}, "trust_domain"),
    ({"health_listen": "50052"}, "health_listen must be host:port"),
])
def test_bad_sections_are_one_clear_error(section, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"stages": STAGES, "security": section})


def _flags(*argv: str, public: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, public=public)
    return parser.parse_args(argv)


def test_flags_override_the_section():
    section = SecurityConfig(tokens="/from/config")
    merged = security_from(_flags("--tls-ca", "c", "--tls-cert", "t", "--tls-key", "k",
                                  "--health-listen", "127.0.0.1:9", "--insecure-plaintext"),
                           section)
    assert (merged.tls, merged.ca, merged.cert, merged.key) == (True, "c", "t", "k")
    assert merged.tokens == "/from/config" and merged.health_listen == "127.0.0.1:9"
    assert merged.allow_plaintext_off_loopback
    assert security_from(_flags("--tokens", "/t"), section).tokens == "/t"
    with pytest.raises(ValueError, match="go together"):
        security_from(_flags("--tls-ca", "c"), section)
    assert not hasattr(_flags(public=False), "tokens")
