"""The command-line options the CA and the agent share."""

import argparse

import pytest

from modelyo.errors import ConfigError
from modelyo.service.options import add_server_arguments, parse_listen


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:0", ("::1", 0)),
        ("host:65535", ("host", 65535)),
    ],
)
def test_listen_addresses_are_parsed(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8443", "is not HOST:PORT"),
        (":8443", "is not HOST:PORT"),
        ("[nope]:1", "is not an IPv6 address"),
        ("127.0.0.1:https", "is not a number"),
        ("127.0.0.1:65536", "port must be 0 to 65535"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_listen(value)


def test_both_server_options_are_required():
    parser = argparse.ArgumentParser(prog="svc", exit_on_error=False)
    add_server_arguments(parser, state_help="state")
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--state-dir", "/tmp/x"])
    assert (args.listen, str(args.state_dir)) == ("127.0.0.1:0", "/tmp/x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--listen", "127.0.0.1:0"])
