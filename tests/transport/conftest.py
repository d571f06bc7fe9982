"""Fixtures of the transport tests (helpers live in transport_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transport_helpers import PeerProcess, start_peer, stop_peer


@pytest.fixture
def peer() -> Iterator[PeerProcess]:
    p = start_peer()
    yield p
    stop_peer(p)
