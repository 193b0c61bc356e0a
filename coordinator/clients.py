"""The client port: submit, status, jobs, cancel, metrics, fetch. Every request gets an OK
or an ERROR naming the problem; nothing a client sends can stop the coordinator's loop.

`handle` returns the reply's (fields, arrays); an ordinary no raises `wire.Refused`, a
malformed request `wire.ProtocolError`. It sees the coordinator only through this view:

    prepare(spec) -> JobRuntime    build + dry-run a submitted job (raises with the reason)
    status() -> dict               workers table and counters
    live_job(id) -> (state, next round, metrics, error) | None   if `id` is the running job
    cancel(id)                     stop it if it is the running job
    authorize(msg, row, action)    raises Refused unless the sender may `action` the job
    cfg.max_queued_jobs
"""

import logging

from .. import wire
from ..jobspec import SpecError, parse_spec
from ..training import JobRuntime
from .store import ACTIVE, FINAL

log = logging.getLogger("shardgrad.coordinator")


class ClientHandler:
    def __init__(self, store, service):
        self.store, self.service = store, service
        self.prepared: dict[str, JobRuntime] = {}  # validated at submit, reused at start

    def handle(self, msg) -> tuple[dict, list | None]:
        return getattr(self, "on_" + msg.type.lower())(msg)

    def _job(self, msg):
        job_id = wire.field_of(msg, "job", str)
        row = self.store.job(job_id)
        if row is None:
            raise wire.Refused(f"no job {job_id!r} (shardgrad status lists the jobs)")
        return row

    # ---- requests -------------------------------------------------------------------------
    def on_submit(self, msg):
        spec = wire.require(msg, "spec")[0]
        if not isinstance(spec, dict | str):
            raise wire.ProtocolError("SUBMIT: 'spec' must be a table or TOML/JSON text")
        limit = self.service.cfg.max_queued_jobs
        if self.store.count(ACTIVE) >= limit:
            raise wire.Refused(
                f"the queue is full ({limit} unfinished jobs); wait for some to finish or "
                "cancel some"
            )
        try:
            job_spec = parse_spec(spec, files=False)
        except SpecError as e:
            raise wire.Refused(f"invalid job spec:\n{e}") from None
        if job_spec.init and job_spec.init.startswith("job:"):
            # starting from a job's weights reveals them: only who may fetch them may
            row = self.store.job(job_spec.init[len("job:") :])
            if row is not None:
                self.service.authorize(msg, row, "fetch")
        try:
            rt = self.service.prepare(job_spec)  # data, labels and micro-batch 0 checked now
        except (ValueError, OSError) as e:  # DataError, DryRunError, unreadable file
            raise wire.Refused(f"job spec {job_spec.name!r} cannot run: {e}") from None
        # The owner is the authenticated CURVE key (None when auth is off), never a field the
        # client chose: cancel and fetch are checked against it.
        owner = msg.user
        job_id = self.store.add_job(job_spec.name, job_spec.to_dict(), owner, rt.total_rounds)
        self.prepared[job_id] = rt
        log.info("job %s (%s) queued", job_id, job_spec.name)
        return {"job": job_id}, None

    def summary(self, row):
        out = {
            k: row[k]
            for k in (
                "id", "name", "state", "round", "total_rounds", "checkpoint_round", "error",
                "placement",  # where its rounds run, once it has started
            )
        }  # fmt: skip
        spec = row["spec"]
        out["micro_batch"] = spec["micro_batch"]
        out["micro_batches"] = spec["global_batch"] // spec["micro_batch"]
        live = self.service.live_job(row["id"])
        if live is not None:
            out["state"], out["round"], metrics, unwritten = live
            out["error"] = unwritten or out["error"]
            if metrics:
                out["last"] = metrics[-1]
        if row["result"]:
            out["eval"] = row["result"]["eval"]
            out["digest"] = row["result"]["digest"]
        return out

    def on_status(self, msg):
        fields = self.service.status()
        if msg.get("job") is not None:
            fields["job"] = self.summary(self._job(msg))
        else:
            fields["jobs"] = [self.summary(r) for r in self.store.jobs()]
        return fields, None

    def on_jobs(self, msg):
        return {"jobs": [self.summary(r) for r in self.store.jobs()]}, None

    def on_cancel(self, msg):
        row = self._job(msg)
        self.service.authorize(msg, row, "cancel")
        if row["state"] in FINAL:
            raise wire.Refused(f"job {row['id']} is already {row['state']}")
        self.store.update(row["id"], state="cancelled")
        self.service.cancel(row["id"])
        self.store.drop_checkpoint(row["id"])
        return {"job": row["id"], "state": "cancelled"}, None

    def on_metrics(self, msg):
        row = self._job(msg)
        live = self.service.live_job(row["id"])
        if live is not None:
            metrics = live[2]
        else:
            metrics = self.store.metrics(row["id"])
        since = msg.get("since", 0)
        since = since if isinstance(since, int) and since >= 0 else 0
        return {"job": row["id"], "metrics": metrics[since:]}, None

    def on_fetch(self, msg):
        row = self._job(msg)
        self.service.authorize(msg, row, "fetch")
        if row["state"] != "done":
            raise wire.Refused(
                f"job {row['id']} is {row['state']}; its weights can be fetched once it is done"
            )
        loaded = self.store.load_result(row["id"])
        if loaded is None:
            raise wire.Refused(f"job {row['id']}: its weights file is missing")
        arrays, meta = loaded
        return {"job": row["id"], "digest": meta["digest"]}, list(arrays.items())
