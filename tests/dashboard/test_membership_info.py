"""The workers table keeps a worker's host and pid when it comes back from a false death
(its heartbeat, which re-registers it, carries no info)."""

from shardgrad.coordinator.membership import Membership


def test_a_worker_back_from_the_dead_keeps_its_host_and_pid():
    m = Membership(interval=0.5, liveness=5)
    assert m.heard("w1", {"host": "h", "pid": 7})
    m.workers["w1"].last_seen -= 10  # silent for 10 s
    assert m.sweep() == ["w1"]
    assert m.heard("w1")  # a heartbeat: back, as a new member
    (row,) = m.table()
    assert row["state"] == "alive" and row["host"] == "h" and row["pid"] == 7
