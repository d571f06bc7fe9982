"""The ``bootstrap`` command, run as users run it."""

import os
import stat
import subprocess
import sys

from p2p_harness import REPO_ROOT, start_bootstrap

from inferencemesh.p2p.identity import Identity


def test_bootstrap_prints_its_persistent_peer_id_and_stops_cleanly(tmp_path):
    key = tmp_path / "boot.key"
    ids = []
    for _ in range(2):
        proc, multiaddr = start_bootstrap("--identity", str(key))
        assert proc.terminate() == 0
        ids.append(multiaddr.rsplit("/p2p/", 1)[1])
        assert multiaddr.startswith("/ip4/127.0.0.1/udp/")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert ids[0] == ids[1] == Identity.load(key).peer_id_hex


def test_bad_bootstrap_address_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, "-m", "inferencemesh", "bootstrap", "--port", "0", "--peers", "/ip4/1.2.3.4/quic/1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "error:" in result.stdout and "/ip4/1.2.3.4/quic/1" in result.stdout
