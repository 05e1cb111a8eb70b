"""The client's scheduler addresses: one, or several replicas to fail over between."""

import pytest

from splitwise.client import parse_addresses


def test_one_address_or_replicas_comma_separated_or_listed():
    assert parse_addresses("127.0.0.1:50051") == ["127.0.0.1:50051"]
    assert parse_addresses("a:1, b:2,") == ["a:1", "b:2"]
    assert parse_addresses(["a:1", "b:2"]) == ["a:1", "b:2"]


def test_no_address_is_refused():
    with pytest.raises(ValueError, match="no scheduler address"):
        parse_addresses(" , ")
