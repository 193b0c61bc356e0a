"""coordinator/width.py: all live workers, or one ahead on a lease, by measured stretch paces."""

from shardgrad.coordinator import width
from shardgrad.coordinator.width import STRETCH, WARMUP, Width


def _rounds(w, live, one, times):
    """Deal and time rounds: times[mode] seconds for a round dealt that way; the deals."""
    dealt = []
    for _ in range(len(times["n"])):
        use = w.use(live, one)
        mode = "one" if use == [one] and len(live) > 1 else "all"
        dealt.append(mode)
        w.observe(times[mode])
    return dealt


def _first_stretch(w, seconds=1.0):
    """The probe's first stretch: on all, and it does not count (a job's first rounds)."""
    for _ in range(w.stretch_rounds()):
        assert w.use(["a", "b"], "a") == ["a", "b"]
        assert w.observe(seconds) is None
    assert w.times == {"all": [], "one": []}


def test_probes_all_then_one_and_keeps_the_faster():
    for fast, slow in (("one", "all"), ("all", "one")):
        w = Width(probe=4, hold=100)
        times = {fast: 0.001, slow: 0.002, "n": range(24)}
        dealt = _rounds(w, ["a", "b"], "a", times)
        probe = 4 + WARMUP
        assert w.probe_rounds() == 3 * probe
        assert dealt[: 2 * probe] == ["all"] * 2 * probe  # the first stretch, then all's
        assert dealt[2 * probe : 3 * probe] == ["one"] * probe
        assert dealt[3 * probe :] == [fast] * (24 - 3 * probe) and w.choice == fast


def test_a_slow_start_does_not_count():
    """A job's first rounds (every process loads the data, its memory is faulted in) are
    slow, and the probe starts on all: they would make all lose. The first stretch does
    not count."""
    w = Width(probe=4, hold=100)
    _first_stretch(w, seconds=0.100)
    for _ in range(2 * w.stretch_rounds()):
        mode = "one" if w.use(["a", "b"], "a") == ["a"] else "all"
        said = w.observe(0.001 if mode == "all" else 0.002)
    assert w.choice == "all" and "1.00 ms on all" in said


def test_a_new_set_of_workers_or_the_hold_probes_again():
    w = Width(probe=2, hold=3)
    _rounds(w, ["a", "b"], "a", {"one": 1.0, "all": 2.0, "n": range(w.probe_rounds())})
    assert w.choice == "one"
    assert w.use(["a", "b", "c"], "a") == ["a", "b", "c"] and w.choice is None  # new set
    w.observe(2.0)
    w = Width(probe=2, hold=3)
    _rounds(w, ["a", "b"], "a", {"one": 1.0, "all": 2.0, "n": range(w.probe_rounds() + 3)})
    assert w.choice is None  # held for 3 rounds, then measuring again


def test_nothing_to_choose():
    assert Width(probe=0).use(["a", "b"], "a") == ["a", "b"]  # --width-probe 0
    assert Width(probe=32).use(["a", "b"], None) == ["a", "b"]  # nobody can take a lease
    w = Width(probe=32)
    assert w.use(["a"], "a") == ["a"] and w.observe(1.0) is None  # alone: nothing to time
    assert w.times == {"all": [], "one": []}


def test_longer_probes_interleave_stretches_so_a_drifting_machine_weighs_on_both(monkeypatch):
    """Two stretches each, of STRETCH counted rounds (each after WARMUP more), ordered all,
    one, one, all (after the first stretch, which does not count). On a machine that slows
    down steadily (3 % a round) during the probe, one worker, truly 10 % faster, still
    wins; probed all-then-one, the drift alone makes it look slower."""

    def probe(w):
        dealt, n = [], 0
        while w.choice is None:
            mode = "one" if w.use(["a", "b"], "a") == ["a"] else "all"
            dealt.append(mode)
            n += 1
            w.observe((0.9 if mode == "one" else 1.0) * (1 + 0.03 * n))
        return dealt

    w = Width(probe=2 * STRETCH, hold=100)
    stretch = WARMUP + STRETCH
    first = ["all"] * stretch  # (it does not count)
    assert probe(w) == first + ["all"] * stretch + ["one"] * 2 * stretch + ["all"] * stretch
    assert w.choice == "one"
    assert len(w.times["one"]) == len(w.times["all"]) == 2  # stretches of STRETCH
    monkeypatch.setattr(width, "STRETCH", 2 * STRETCH)  # one stretch each: all, then one
    naive = Width(probe=2 * STRETCH, hold=100)
    probe(naive)
    assert naive.choice == "all"


def test_rounds_done_by_what_a_lease_holder_computed_ahead_say_nothing_about_all():
    """After a stretch on one worker, the first rounds dealt to all can be completed by
    the sums that worker had computed ahead: instantly. They do not count (the stretch goes
    on without them), or one would lose to all on an illusion."""
    w = Width(probe=4, hold=100)
    _first_stretch(w)
    for _ in range(WARMUP + 4):  # all: 2 ms a round
        w.use(["a", "b"], "a")
        w.observe(0.002)
    for _ in range(WARMUP + 3):  # one: 1 ms a round
        assert w.use(["a", "b"], "a") == ["a"]
        w.observe(0.001)
    w.use(["a", "b"], "a")
    assert w.observe(0.001) is not None and w.choice == "one"
    w = Width(probe=4, hold=100)
    _first_stretch(w)
    for _ in range(WARMUP + 4):
        w.use(["a", "b"], "a")
        w.observe(0.002, ahead=True)  # all done by sums computed ahead: none count
    assert w.times["all"] == [] and w.use(["a", "b"], "a") == ["a", "b"]


def test_a_stretch_is_timed_by_its_span_not_its_rounds_paces():
    """Ahead on a lease, the workers may compute a whole stretch while the coordinator
    (which yields the CPU to them) is still on its first rounds; it then steps the rest at
    once. Those rounds' paces are tiny, but the stretch took as long as its span: here
    3.4 ms a round on all, against a steady 2 ms on one. One wins."""
    w = Width(probe=4, hold=100)
    _first_stretch(w)
    paces = [0.010, 0.010, 0.0001, 0.0001, 0.0001, 0.0001]  # all: 20.4 ms for 6 rounds
    for pace in paces:
        assert w.use(["a", "b"], "a") == ["a", "b"]
        w.observe(pace)
    for _ in paces:
        assert w.use(["a", "b"], "a") == ["a"]
        said = w.observe(0.002)
    assert w.choice == "one" and "3.40 ms on all" in said


def test_rounds_done_by_what_the_members_computed_ahead_say_nothing_about_one():
    """The other way round: after a stretch on all (ahead on their lease of several, the
    members may be rounds ahead of our step), the first rounds dealt to one can be
    completed by the members' sums. They do not count for one either."""
    w = Width(probe=4, hold=100)
    _first_stretch(w)
    for _ in range(WARMUP + 4):  # all: 1 ms a round
        w.use(["a", "b"], "a")
        w.observe(0.001)
    for _ in range(5):  # dealt to one, done at once by what the members computed ahead
        assert w.use(["a", "b"], "a") == ["a"]
        w.observe(0.00001, ahead=True)
    assert w.times["one"] == [] and w.into == 0
    for _ in range(WARMUP + 4):  # one: 2 ms a round
        assert w.use(["a", "b"], "a") == ["a"]
        w.observe(0.002)
    assert w.choice == "all"
