"""Which attention backend a job's replicas run, and why: from each rank to its replica, to the
pool, to the output rows, _metrics.json and the manifest (pure Python: the driver imports it).

A rank decides once, at start-up (pipeline.engine.worker.RankWorker.setup): with DCA,
`dca.prepare_backend(model, kv_dtype=...)` chooses the backend for the job's KV dtype and runs
its start-up self-check (dca/selfcheck.py); the rank's record is that `dca.BackendReport` as a
dict (requested, chosen, ran, fallback_reason, checked, device, dtype, kv_dtype, check_seconds).
Without DCA the record is the model's own attention as transformers loaded it
(`config._attn_implementation`: "sdpa", "eager", ...; `dca` False). Nothing is read per step.

The ranks' records go back to the driver with the rank's setup answer; `replica_record` joins
them. The ranks of a replica normally agree (same device type, dtype and head layout); when they
do not (one rank's self-check failed, another's passed), the replica's backend is "mixed" and
its fallback reason says which rank ran what and why. Replicas may differ (another GPU type, a
rebuilt replica): every answered row carries its own replica's (`columns_of`); a row no replica
answered (bad input, a prompt too long, a request the pool failed) carries the engine's when all
replicas agree (`engine_record`), else nulls.

Output columns (pipeline.data.schema):

    attention_backend           what computed the row's attention: "triton" | "flash" | "torch"
                                (DCA on), the model's own ("sdpa", "eager", ...; DCA off), or
                                "mixed" (the replica's ranks disagree)
    attention_backend_fallback  why that differs from what the job asked for (the self-check's
                                finding, one line), else null
"""

from __future__ import annotations

ATTENTION_COLUMNS = ("attention_backend", "attention_backend_fallback")
# The replica's backend when its ranks run different ones.
MIXED = "mixed"


def model_attention_record(*, rank: int, requested: str, ran: str | None, device: str, dtype: str,
                           kv_dtype: str) -> dict:
    """A rank's record when DCA is off: the attention transformers runs. `requested` is the
    ModelSpec's attn_implementation, `ran` the model's config._attn_implementation (transformers
    may pick another one when the requested one is unavailable: that is the fallback)."""
    reason = None
    if ran != requested:
        reason = f"transformers loaded attn_implementation {ran!r} instead of the requested {requested!r}"
    return {"rank": rank, "dca": False, "requested": requested, "chosen": requested, "ran": ran,
            "fallback_reason": reason, "checked": False, "device": device, "dtype": dtype, "kv_dtype": kv_dtype,
            "check_seconds": None}


def dca_attention_record(*, rank: int, report: dict) -> dict:
    """A rank's record with DCA: its dca.BackendReport.to_dict()."""
    return {"rank": rank, "dca": True, **report}


def replica_record(ranks: list[dict]) -> dict:
    """One replica's record from its ranks' (rank order): backend, fallback (one line or None),
    ranks_agree, ranks (the rank records as they came)."""
    if not ranks:
        return {"backend": None, "fallback": None, "ranks_agree": True, "ranks": []}
    ran = [r.get("ran") for r in ranks]
    reasons = [(r.get("rank", i), r.get("fallback_reason")) for i, r in enumerate(ranks) if r.get("fallback_reason")]
    agree = len(set(ran)) == 1
    if agree:
        backend = ran[0]
        distinct = {reason for _, reason in reasons}
        if not reasons:
            fallback = None
        elif len(distinct) == 1 and len(reasons) == len(ranks):
            fallback = reasons[0][1]  # every rank fell back for the same reason: say it once
        else:
            fallback = "; ".join(f"rank {rank}: {reason}" for rank, reason in reasons)
    else:
        backend = MIXED
        who = ", ".join(f"rank {r.get('rank', i)} ran {r.get('ran')!r}" for i, r in enumerate(ranks))
        why = "".join(f"; rank {rank}: {reason}" for rank, reason in reasons)
        fallback = f"the ranks of this replica disagree: {who}{why}"
    return {"backend": backend, "fallback": fallback, "ranks_agree": agree, "ranks": ranks}


def columns_of(record: dict | None) -> dict:
    """The output columns of a replica's (or the engine's) record; nulls for None."""
    if record is None:
        return dict.fromkeys(ATTENTION_COLUMNS)
    return {"attention_backend": record.get("backend"), "attention_backend_fallback": record.get("fallback")}


def engine_record(replicas: dict[str, dict | None]) -> dict:
    """The whole engine's record from its replicas' (name -> replica_record, None for a replica
    that never started): backend and fallback when every started replica has the same pair (else
    None: see by_replica), replicas_agree, requested (what the job asked for), by_replica
    (name -> backend, fallback, ranks_agree, ranks)."""
    started = {name: record for name, record in replicas.items() if record is not None}
    pairs = {(record["backend"], record["fallback"]) for record in started.values()}
    agree = len(pairs) == 1
    backend, fallback = pairs.pop() if agree else (None, None)
    requested = next((rank.get("requested") for record in started.values() for rank in record["ranks"]), None)
    return {"backend": backend, "fallback": fallback, "replicas_agree": agree or not started,
            "requested": requested, "by_replica": started}


def engine_record_of_stats(stats: dict | None) -> dict | None:
    """`engine_record` of ReplicaPool.stats() (or the ray-data dataflow's merged stats: keys
    `<actor>/<replica>`); None when no replica reported one (a stand-in pool, no engine)."""
    if not isinstance(stats, dict):
        return None
    replicas = {name: values.get("attention") for name, values in stats.items()
                if isinstance(values, dict) and values.get("attention") is not None}
    return engine_record(replicas) if replicas else None


def describe(record: dict | None) -> str:
    """One line for people (jobs.show, logs)."""
    if record is None:
        return "attention backend: not recorded"
    if record.get("backend") is None and record.get("by_replica"):
        parts = [f"{name} {r['backend']}" + (f" (fallback: {r['fallback']})" if r["fallback"] else "")
                 for name, r in sorted(record["by_replica"].items())]
        return "attention backend by replica: " + "; ".join(parts)
    text = f"attention backend {record.get('backend')}"
    if record.get("requested") and record.get("requested") != record.get("backend"):
        text += f" (asked for {record['requested']})"
    if record.get("fallback"):
        text += f"; fallback: {record['fallback']}"
    return text


__all__ = ["ATTENTION_COLUMNS", "MIXED", "model_attention_record", "dca_attention_record", "replica_record",
           "columns_of", "engine_record", "engine_record_of_stats", "describe"]
