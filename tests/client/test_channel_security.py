"""Client channel settings for a secured coordinator: DITSERVE_TOKEN, and no bearer token
in plaintext to another host."""

from __future__ import annotations

import pytest
from ditserve_client.channel import TOKEN_ENV, ChannelSettings


def test_token_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert ChannelSettings("127.0.0.1:1").token == "from-env"
    assert ChannelSettings("127.0.0.1:1", token="given").token == "given"
    assert ChannelSettings("127.0.0.1:1", token="").token == ""
    monkeypatch.delenv(TOKEN_ENV)
    assert ChannelSettings("127.0.0.1:1").token is None


@pytest.mark.parametrize("target", ["10.0.0.8:50050", "coordinator.example:443", "[::]:1"])
def test_no_token_in_plaintext_off_loopback(target, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="refusing to send a bearer token in plaintext") as e:
        ChannelSettings(target, token="s3cret")
    assert "s3cret" not in str(e.value)
    assert ChannelSettings(target, tls=True, token="s3cret").credentials() is not None
    assert ChannelSettings(target).metadata() == ()


@pytest.mark.parametrize("target", ["127.0.0.1:1", "localhost:1", "[::1]:1"])
def test_token_metadata_on_loopback_plaintext(target):
    assert ChannelSettings(target, token="t").metadata() == (("authorization", "Bearer t"),)
