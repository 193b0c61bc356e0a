"""Where a job's rounds are computed: on the workers, or on the coordinator itself.

A round through workers has a fixed cost whatever its compute: a TASK out, a process
wake-up, the weights set, the sums checked, a GRADS back, another wake-up. It is about
1.5-2 ms on a 2-core machine. With N workers a round then costs F + C/N, against C in
one process, so a round whose whole compute C is below F is faster in one process for
every N. Such a job runs on the coordinator: the same JobRuntime and RoundEngine as
`train --local`, so the same bits; workers stay idle for it. Big jobs, and every job
whose spec says `placement = "workers"`, go to the workers.

    choose(rt, inline_below_s)   where, and why (said in the log, `status` and the result)
    rounds_here(engine, until)   the rounds of a job placed here, a slice at a time
"""

import time

from ..core.sampling import all_finite

DEFAULT_INLINE_BELOW_S = 0.002  # F above; 0 sends every job to the workers

# Time a whole round only when the dry run's micro-batch says it may be small: a round of a
# big model must not stall the coordinator to find out it is big.
_WORTH_TIMING = 4.0


def choose(rt, inline_below_s: float, dry_run_s: float | None = None) -> tuple[str, str]:
    """("coordinator" | "workers", why) for `rt`'s job. `dry_run_s`: how long the submit's
    dry run of one micro-batch took (it includes warm-up, so it only rules jobs out)."""
    if rt.spec.placement == "workers":
        return "workers", "the spec says placement = 'workers'"
    if inline_below_s <= 0:
        return "workers", "the coordinator runs every job on workers (--inline-below 0)"
    budget = inline_below_s * _WORTH_TIMING
    try:
        if dry_run_s is None:  # queued before a restart: a first look, bounded in time
            rt.dry_run(budget)
            dry_run_s = rt.dry_run_s
        if dry_run_s >= budget:
            return "workers", f"a micro-batch takes {dry_run_s * 1e3:.1f} ms or more"
        one = _best_of(lambda: rt.micro_batch_grad(0, 0), 2)
        if one * rt.n_micro > budget:
            return "workers", f"a round takes ~{one * rt.n_micro * 1e3:.1f} ms"
        whole = _best_of(lambda: rt.block_grad(0, 0, rt.n_micro), 3)
    except Exception as e:  # job code (or DryRunError): the workers report it, with retries
        return "workers", f"timing a round raised {type(e).__name__}"
    ms, limit = whole * 1e3, inline_below_s * 1e3
    if whole < inline_below_s:
        return "coordinator", (
            f"a round's compute ({ms:.2f} ms) is below a round trip to workers "
            f"({limit:g} ms): one process is faster; placement = 'workers' forces workers"
        )
    return "workers", f"a round takes {ms:.2f} ms (at least {limit:g} ms goes to workers)"


def _best_of(fn, tries: int) -> float:
    """The fastest of `tries` calls: the others paid warm-up or a busy core."""
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class JobFailed(Exception):
    """A round computed here raised or came out non-finite: it would on every worker too."""


def rounds_here(engine, until: float):
    """Compute, sum and step rounds of `engine`'s job in this process until the monotonic
    clock passes `until` or the job is done; yields each round's metrics row (the caller
    records it) and raises JobFailed naming the round."""
    rt = engine.rt
    while not engine.done and time.monotonic() < until:
        r, t0 = engine.next_round, time.perf_counter()
        try:
            total = rt.block_grad(r, 0, rt.n_micro)  # the canonical tree, as on workers
        except Exception as e:  # job code: the spec's model on the spec's data
            micro = getattr(e, "micro_batch", None)
            where = f"round {r}" + (f", micro-batch {micro}" if type(micro) is int else "")
            raise JobFailed(f"{where}: {type(e).__name__}: {e}") from None
        if not all_finite(total):
            raise JobFailed(
                f"round {r}: the gradient has NaN/Inf; the data or the learning rate is at fault"
            )
        compute = time.perf_counter() - t0
        row = engine.step(total)
        round_s = time.perf_counter() - t0
        row.update(
            round_s=round_s, compute_s=compute, reduce_s=0.0, overhead_s=round_s - compute,
            transfer_s=0.0, workers=0, blocks=1, checked=0,
            samples_per_s=rt.global_batch / max(round_s, 1e-9),
        )  # fmt: skip
        yield row
