"""HOST:PORT parsing shared by the launcher, the gateway and every server's listen flag."""

import pytest
from ditserve.common.address import join_host_port, split_host_port
from ditserve.common.lifecycle import ListenError
from ditserve.common.lifecycle import split_host_port as listen_split
from ditserve.common.status import CommandError, UserError


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)),
    ("[::1]:8080", ("::1", 8080)),
    ("[::]:0", ("::", 0)),
    (":50051", ("", 50051)),
    ("ditserve-stage-0.ditserve:50051", ("ditserve-stage-0.ditserve", 50051)),
])
def test_split_and_join_round_trip(address, expected):
    assert split_host_port(address) == expected
    if expected[0]:
        assert join_host_port(*expected) == address


@pytest.mark.parametrize("address", ["127.0.0.1", "host:", "host:http", "host:70000", ""])
def test_a_bad_address_names_what_it_was(address):
    with pytest.raises(CommandError, match=r"--listen must be HOST:PORT, got"):
        split_host_port(address, "--listen", CommandError)
    with pytest.raises(ListenError, match=repr(address)):
        listen_split(address)
    assert issubclass(ListenError, UserError)
