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


def test_a_process_restarted_under_the_same_id_offers_only_what_it_says():
    """Its new READY replaces the old process's info: a worker that had shared memory and a
    peer port, restarted without them (same id, a new pid), must not keep them."""
    m = Membership(interval=0.5, liveness=5)
    assert m.heard("w1", {"host": "h", "pid": 7, "shm": True, "lease": True, "peer": "ipc://p"})
    assert not m.heard("w1", {"host": "h2", "pid": 8, "lease": True})
    assert m.workers["w1"].info == {"host": "h2", "pid": 8, "lease": True}
    assert not m.on_this_host("w1")
