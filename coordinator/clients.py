"""The client port: submit, status, jobs, cancel, metrics, fetch. Every request gets an OK
or an ERROR naming the problem; nothing a client sends can stop the coordinator's loop."""

import logging

from .. import wire
from ..jobspec import SpecError, parse_spec
from ..training import JobRuntime
from .store import ACTIVE, FINAL

log = logging.getLogger("shardgrad.coordinator")


class ClientHandler:
    def __init__(self, coord):
        self.coord = coord
        self.prepared: dict[str, JobRuntime] = {}  # validated at submit, reused at start

    def handle(self, msg):
        handler = getattr(self, "on_" + msg.type.lower())
        fields, arrays = handler(msg)
        fields.setdefault("req", msg.get("req"))
        self.coord._send(self.coord.clients, msg.envelope, wire.OK, fields, arrays)

    def error(self, msg, message):
        self.coord._send(
            self.coord.clients,
            msg.envelope,
            wire.ERROR,
            {"message": message, "req": msg.get("req")},
        )

    def _job(self, msg):
        job_id = wire.field_of(msg, "job", str)
        row = self.coord.store.job(job_id)
        if row is None:
            raise wire.ProtocolError(f"no job {job_id!r} (shardgrad status lists the jobs)")
        return row

    # ---- requests -------------------------------------------------------------------------
    def on_submit(self, msg):
        spec = wire.require(msg, "spec")[0]
        if not isinstance(spec, dict | str):
            raise wire.ProtocolError("SUBMIT: 'spec' must be a table or TOML/JSON text")
        if self.coord.store.count(ACTIVE) >= self.coord.cfg.max_queued_jobs:
            raise wire.ProtocolError(
                f"the queue is full ({self.coord.cfg.max_queued_jobs} unfinished jobs); "
                "wait for some to finish or cancel some"
            )
        try:
            job_spec = parse_spec(spec, files=False)
            rt = JobRuntime(job_spec, self.coord.data_root)  # data and model checked now
        except SpecError as e:
            raise wire.ProtocolError(f"invalid job spec:\n{e}") from None
        except (ValueError, OSError) as e:
            raise wire.ProtocolError(f"job spec {job_spec.name!r} cannot run: {e}") from None
        # The owner is the authenticated CURVE key (None when auth is off), never a field the
        # client chose: cancel and fetch are checked against it.
        owner = msg.user
        job_id = self.coord.store.add_job(job_spec.name, job_spec.to_dict(), owner, rt.total_rounds)
        self.prepared[job_id] = rt
        log.info("job %s (%s) queued", job_id, job_spec.name)
        return {"job": job_id}, None

    def summary(self, row):
        out = {
            k: row[k]
            for k in ("id", "name", "state", "round", "total_rounds", "checkpoint_round", "error")
        }
        active = self.coord.job
        if active is not None and active.id == row["id"]:
            out["state"] = active.state
            out["round"] = active.next_round
            if active.metrics:
                out["last"] = active.metrics[-1]
        if row["result"]:
            out["eval"] = row["result"]["eval"]
            out["digest"] = row["result"]["digest"]
        return out

    def on_status(self, msg):
        fields = {"workers": self.coord.members.table(), "counters": dict(self.coord.counters)}
        if msg.get("job") is not None:
            fields["job"] = self.summary(self._job(msg))
        else:
            fields["jobs"] = [self.summary(r) for r in self.coord.store.jobs()]
        return fields, None

    def on_jobs(self, msg):
        return {"jobs": [self.summary(r) for r in self.coord.store.jobs()]}, None

    def on_cancel(self, msg):
        row = self._job(msg)
        self.coord.gate.authorize(msg, row, "cancel")
        if row["state"] in FINAL:
            raise wire.ProtocolError(f"job {row['id']} is already {row['state']}")
        active = self.coord.job
        self.coord.store.update(row["id"], state="cancelled")
        if active is not None and active.id == row["id"]:
            self.coord.end_job()
        self.coord.store.drop_checkpoint(row["id"])
        return {"job": row["id"], "state": "cancelled"}, None

    def on_metrics(self, msg):
        row = self._job(msg)
        active = self.coord.job
        if active is not None and active.id == row["id"]:
            metrics = active.metrics
        else:
            metrics = row["result"]["metrics"] if row["result"] else []
        since = msg.get("since", 0)
        since = since if isinstance(since, int) and since >= 0 else 0
        return {"job": row["id"], "metrics": metrics[since:]}, None

    def on_fetch(self, msg):
        row = self._job(msg)
        self.coord.gate.authorize(msg, row, "fetch")
        if row["state"] != "done":
            raise wire.ProtocolError(
                f"job {row['id']} is {row['state']}; its weights can be fetched once it is done"
            )
        loaded = self.coord.store.load_result(row["id"])
        if loaded is None:
            raise wire.ProtocolError(f"job {row['id']}: its weights file is missing")
        arrays, meta = loaded
        return {"job": row["id"], "digest": meta["digest"]}, list(arrays.items())
