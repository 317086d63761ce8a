"""The single-writer lease: exactly one of many simultaneous writers wins; dead holders are taken over."""

from __future__ import annotations

import json
import threading

import fsspec
import pytest

from actstore.pipeline.extract.lease import Lease, LeaseError


@pytest.mark.parametrize("proto", ["file", "memory"])
def test_one_of_many_racing_writers_wins(tmp_path, proto):
    fs = fsspec.filesystem(proto)
    root = str(tmp_path / "out") if proto == "file" else f"/race-{tmp_path.name}"
    start, wins, losses = threading.Barrier(6), [], []
    lock, all_lost = threading.Lock(), threading.Event()

    def run() -> None:
        start.wait()
        try:
            with Lease(fs, root, "out", beat=0.5):
                wins.append(1)
                # Hold the lease until every other writer has been refused (a condition, not a timeout: on a
                # busy machine a loser may take long to try, and must still find the lease held).
                all_lost.wait(300)
        except LeaseError:
            with lock:
                losses.append(1)
                if len(losses) == 5:
                    all_lost.set()

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(wins) == 1 and len(losses) == 5
    assert not fs.exists(root + "/lease.json")  # released on exit


def test_dead_holder_is_taken_over(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    fs.makedirs(root)
    # a holder on this host whose process is gone (pid 2**22 + 1 is above Linux' default pid_max)
    (tmp_path / "out" / "lease.json").write_text(json.dumps({"owner": f"{__import__('socket').gethostname()}:"
                                                                      f"{2**22 + 1}:dead", "heartbeat": 9e18}))
    with Lease(fs, root, "out") as lease:
        assert json.loads((tmp_path / "out" / "lease.json").read_text())["owner"] == lease.owner
