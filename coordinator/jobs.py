"""A job's life on the coordinator: from the head of the queue to running (its runtime,
placement, lease window, checkpoint to resume from), rounds placed here, what follows each
step (metrics row, checkpoint, the end), and its end: result written (retried while the
disk refuses), failed, or cancelled. Also what the client port asks about jobs.

`Jobs` is the part of the Coordinator that does this; it uses the coordinator's store,
members, config and counters. The rounds themselves are server.py's.
"""

import logging
import sqlite3
import time

import numpy as np

from .. import wire
from ..core.sampling import assign_blocks
from ..engine import RoundEngine
from ..jobspec import SpecError, parse_spec
from ..malloc import give_back_memory
from ..training import JobRuntime
from .job import ActiveJob
from .placement import JobFailed, choose, rounds_here
from .verify import Verifier
from .width import Width

log = logging.getLogger("shardgrad.coordinator")


class Jobs:
    # ---- what the client port asks about jobs (ClientHandler's narrow view of us) --------
    def prepare(self, spec) -> JobRuntime:
        """Build a submitted job and dry-run its micro-batch 0, so what can fail at submit
        fails there. Raises SpecError / ValueError / OSError with the reason."""
        rt = JobRuntime(spec, self.data_root)
        rt.load_init(self.job_weights)
        rt.dry_run(self.cfg.dry_run_seconds)
        return rt

    def job_weights(self, job_id) -> dict:
        """A done job's final weights, for a spec's `init = "job:ID"`."""
        row = self.store.job(job_id)
        if row is None or row["state"] != "done":
            state = "no such job" if row is None else f"it is {row['state']}"
            raise ValueError(f"init 'job:{job_id}': {state}; it must name a done job")
        loaded = self.store.load_result(job_id)
        if loaded is None:
            raise ValueError(f"init 'job:{job_id}': its weights file is missing")
        return loaded[0]

    def live_job(self, job_id):
        """(state, next round, metrics, error) of `job_id` if it is the running job, else
        None. `error` says why its result is not written yet, when it is not."""
        job = self.job
        if job is None or job.id != job_id:
            return None
        return job.state, job.engine.next_round, job.engine.metrics, job.unwritten

    def cancel(self, job_id):
        self.client_handler.prepared.pop(job_id, None)  # a queued one's data goes too
        self.placements.pop(job_id, None)
        if self.job is not None and self.job.id == job_id:
            self.end_job()

    # ---- a job's life ---------------------------------------------------------------------
    def start_next_job(self):
        row = self.store.next_job()
        if row is None:
            return
        prepared = self.client_handler.prepared  # built (and dry-run) at submit
        try:
            rt = prepared.get(row["id"])
            if rt is None:  # queued before a restart
                rt = JobRuntime(parse_spec(row["spec"], files=False), self.data_root)
                rt.load_init(self.job_weights)  # a checkpoint, if any, overrides it below
                prepared[row["id"]] = rt
        except (SpecError, ValueError, OSError) as e:
            self.store.update(row["id"], state="failed", error=f"could not start: {e}")
            return
        if row["id"] not in self.placements:  # decided once, before the workers are counted
            self.placements[row["id"]] = choose(rt, self.cfg.inline_below_s, rt.dry_run_s)
        where, why = self.placements[row["id"]]
        if where == "workers" and row["state"] == "queued":
            if self.capacity() < row["spec"]["min_workers"]:
                return  # FIFO: the head of the queue waits for its workers
        del prepared[row["id"]], self.placements[row["id"]]
        job = ActiveJob(row["id"], RoundEngine(rt), rt.spec.to_dict(), Verifier(rt.spec.verify))
        job.layout = rt.sum_layout()
        job.width = Width(self.cfg.width_probe)
        # What runs ahead waits in queues and in `early`: at most ~64 MiB of sums.
        sum_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in job.layout)
        sum_bytes *= len(assign_blocks(rt.n_micro, ["one"], self.cfg.blocks_per_worker)["one"])
        job.window = min(self.cfg.lease_window, 64, max(2, (64 << 20) // max(sum_bytes, 1)))
        ckpt = self.store.load_checkpoint(job.id)
        if ckpt is not None:
            arrays, meta = ckpt
            job.engine.restore(arrays, meta)
            job.round_times = meta.get("round_times", [])
            log.info("job %s resumes from its checkpoint at round %d", job.id, meta["round"])
        job.placement, job.here_from = where, job.engine.next_round
        log.info("job %s runs on the %s: %s", job.id, where, why)
        self.job = job
        self.store.update(job.id, state="running", round=job.engine.next_round, placement=where)
        if job.engine.done:  # stopped between its last round and its result
            self.finish_job()
        elif where == "workers":
            self.start_round()  # (one placed here runs from `tick`)

    def _set_state(self, state):
        if self.job.state != state:
            self.job.state = state
            self.store.update(self.job.id, state=state)

    def run_here(self, slice_s=0.02):
        """Rounds of a job placed on the coordinator, for about `slice_s` per pass of the
        loop, so that clients and workers are still answered between slices."""
        job = self.job
        self._set_state("running")  # workers leaving does not pause it
        try:
            for row in rounds_here(job.engine, time.monotonic() + slice_s):
                self.after_step(row)
                if self.job is not job:  # it ended
                    return
        except JobFailed as e:
            self.fail_job(str(e))
        except Exception as e:  # its step, evaluation or checkpoint: costs the job, not the loop
            log.exception("job %s: a round computed here failed", job.id)
            if self.job is job:
                self.fail_job(f"round {job.engine.next_round}: {type(e).__name__}: {e}")

    def after_step(self, row, since=None):
        """A round is in the weights: its metrics row, the job's end, a checkpoint (due when
        a multiple of checkpoint_every lies past `since`, the round before this step's
        rounds: a followed lease's state takes in several)."""
        job, engine = self.job, self.job.engine
        engine.record(row)
        self.http.observe_round(job.id, row)
        if engine.done:
            return self.finish_job()
        every, since = (
            job.rt.spec.checkpoint_every,
            engine.next_round - 1 if since is None else since,
        )
        if engine.next_round // every > since // every:
            # On workers the checkpoint overlaps the next round; computed here it does not,
            # and its rounds can be shorter than its fsyncs: it skips due checkpoints to
            # spend at most a tenth of the time writing them.
            if not job.here or time.monotonic() >= job.next_checkpoint:
                self.checkpoint()  # also records the round in the queue database

    def checkpoint(self) -> bool:
        """Write the job's state; False (logged, counted) if the disk refused: the job goes
        on, and the next checkpoint tries again."""
        t0 = time.monotonic()
        arrays, meta = self.job.engine.pack()
        meta["round_times"] = self.job.round_times[-20:]
        try:
            self.store.save_checkpoint(self.job.id, arrays, meta)
        except (OSError, sqlite3.Error) as e:
            self.counters["write_errors"] += 1
            log.error("job %s: could not write its checkpoint: %s", self.job.id, e)
            return False
        now = time.monotonic()
        self.job.next_checkpoint = now + 9 * (now - t0)
        return True

    def finish_job(self):
        """Write the result of a job whose last round is in. A full or broken disk must not
        lose it at once, nor run rounds past its end: tick retries, doubling the wait, for
        write_retry_s; then the job fails with the reason."""
        job = self.job
        result = job.engine.result()
        try:
            self.store.save_result(job.id, job.rt.state_dict(), result)
        except (OSError, sqlite3.Error) as e:
            self.counters["write_errors"] += 1
            now = time.monotonic()
            first, _, delay = job.write_retry if job.unwritten else (now, 0.0, 1.0)
            job.unwritten = f"its result could not be written to {self.store.dir}: {e}"
            if now - first >= self.cfg.write_retry_s:
                return self.fail_job(
                    f"{job.unwritten} (tried for {now - first:.0f} s; free space in or fix "
                    "the state directory, then submit the job again)"
                )
            job.write_retry = (first, now + delay, min(2 * delay, 30.0))
            log.error("job %s: %s; trying again in %.0f s", job.id, job.unwritten, delay)
            return
        self.store.update(job.id, round=job.engine.next_round)
        self.store.drop_checkpoint(job.id)
        log.info("job %s done: %s", job.id, result["eval"])
        self.end_job()

    def fail_job(self, message):
        log.error("job %s failed: %s", self.job.id, message)
        try:
            self.store.update(self.job.id, state="failed", error=message)
            self.store.drop_checkpoint(self.job.id)
        except (OSError, sqlite3.Error) as e:  # the queue itself is unwritable: a restart
            self.counters["write_errors"] += 1  # finds the job running and resumes it
            log.error("job %s: could not record its failure: %s", self.job.id, e)
        self.end_job()

    def end_job(self):
        for wid in self.members.live():
            self._send(self.workers, wid.encode(), wire.STOP_JOB, {"job": self.job.id})
        self.job = None
        self.local.board.close()  # the next job publishes its own weights
        give_back_memory()  # (what we kept for its next step)
