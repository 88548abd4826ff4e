"""The engine: replicas of one model, each a group of Ray actors sharded with DeepSpeed AutoTP.

Public API (what the data plane calls)::

    from pipeline.config.engine import EngineConfig
    from pipeline.config.model import ModelSpec
    from pipeline.config.task import SamplingParams
    from pipeline.engine import ReplicaPool
    from pipeline.engine.requests import GenerationRequest

    config = EngineConfig(model_spec=ModelSpec(model="smollm2"), tp_size=2, replicas=2)
    with ReplicaPool(config) as pool:            # start() on enter, shutdown() on exit
        future = pool.submit(request)            # concurrent.futures.Future -> list[GenerationResult]
        results = future.result()                # one result per suffix, suffix_index order
        for results in pool.run(requests, max_in_flight=16):
            ...                                  # one list per request, in completion order
        pool.stats()                             # {replica name: {load_s, served, failures, restarts, ...}}

- `EngineConfig` (pipeline.config.engine): frozen, keyword-only; `EngineConfig.from_file(path)` reads JSON.
- `ReplicaPool.start()` validates everything it can before starting any actor (Ray resources on
  one node for tp_size ranks, the model path) and raises `EngineStartupError` with what is
  missing instead of hanging; waiting for free resources is bounded by `placement_timeout_s`,
  model loading by `startup_timeout_s`.
  If Ray is not initialised it calls `ray.init(address=config.ray_address)` (None: a local
  cluster; "auto": the cluster of `ray start` / `ray job submit`); an initialised Ray is used as is.
- `submit` / `run` never raise for a bad request: it comes back as error results
  (`pipeline.engine.requests` error types: prompt_too_long above `max_input_tokens`, invalid_input,
  wont_fit (the memory planner's numbers, before any compute), out_of_memory, replica_failed,
  internal_error). Every request gets exactly one list of results.
- `shutdown()` kills the actors, removes the placement groups and DeepSpeed's /dev/shm files.

The package, along its seams (its settings are `pipeline.config.engine.EngineConfig`):

    errors.py         EngineError, EngineStartupError, short_error (pure)
    requests.py       GenerationRequest, GenerationResult, the error types (pure)
    scheduler.py      the batching policy: admission into the running batch, static batches (pure)
    memory_plan.py    the memory planner: a request's peak memory, the KV budget (pure)
    metering.py       the device-time rule: ForwardMeter on a rank, Ledger on the driver
    pool.py           ReplicaPool: the queue, one serving thread per replica, the failure policy
    replica.py        Replica: placement group, rank actors, one call on every rank, its errors
    worker.py         RankWorker: the Ray actor holding one shard (torch & co. imported there only)
    models.py         model loading, config, tokenizer, content fingerprint (torch inside functions)
    continuous.py     the running batch on a rank (packed forwards), generate_continuous in process
    kv_cache.py       per-row KV slots and the packed-rows cache the DCA attention reads
    generation.py     RankContext, the static path (generate_batch)
    tokens.py         token choice and stop rules on rank 0 (TokenState), end-of-sequence ids
    out_of_memory.py  recognising out of memory, and the one out_of_memory answer
    messages.py       what ranks and the driver send each other

How a replica works: `tp_size` actors in one STRICT_PACK placement group (one bundle of
`cpus_per_rank` CPUs, plus one GPU on CUDA, per rank). Rank 0 picks a free port on its node;
every rank sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE (without it DeepSpeed's CPU shared-memory
all-reduce crashes), MASTER_ADDR/PORT and CUDA_VISIBLE_DEVICES (the group's GPUs, in rank order,
so LOCAL_RANK selects the rank's own GPU and NCCL sees its peers), then joins a torch.distributed
group (nccl on CUDA, gloo on CPU), loads the model on CPU (`load_model_for_tp`) and calls
`deepspeed.init_inference` with AutoTP and kernel injection off (the DCA attention stays).
With tp_size 1 there is no torch.distributed and no DeepSpeed at all. Every call goes to every
rank; rank 0 chooses tokens and broadcasts them each step, and its results are returned with
metrics from every rank (`metering`: device time max over ranks and summed over ranks,
per-rank peaks).

Scheduling inside a replica (`EngineConfig.scheduler`): requests wait in one queue shared by the
replicas.

- "continuous" (default): each replica's ranks keep a running batch between calls. The serving
  thread admits waiting requests, first come first served, while their rows fit `max_batch_size`
  and their KV cache (every row's prompt + max_new_tokens, reserved whole) fits the KV budget the
  memory planner leaves beside the weights and one step's activations (`MemoryPlan.kv_budget`;
  device memory from `device_memory_bytes`, the GPU, or on CPU the machine's share per rank).
  Then one call runs steps: every step is one packed forward with a decode token per running row
  and prompt blocks of rows still prefilling (`prefill_block` tokens per step), so a long prefill
  advances a block at a time while the others keep decoding. A call returns as soon as a row
  ends (its slot is freed that step and its request, when all its rows ended, is answered) or
  after about a second, so new requests join at the next step. A model without DCA runs static.
- "static": the oldest request, plus later single-suffix requests while the left-padded batch
  stays within `max_batch_tokens` (padded prompt tokens) and `max_batch_size` rows, run together
  until the last row ends; a request whose prompt alone fills the budget, and every request with
  several suffixes, runs alone. Kept for comparison (benchmarks/throughput.py).

Failures (no hang, ever: every request gets its one list of results, or `run` raises
`EngineError`):

- A rank that dies (or a batch that runs past `request_timeout_s`, one hour by default; with the
  continuous scheduler: a request resident that long) takes the whole replica down: its actors
  are killed, its batch (continuous: every request resident on it) goes back to the front of the
  queue
  (another replica or the rebuilt one runs it; results only ever come from a completed batch, so
  nothing is lost or returned twice) and the replica is rebuilt, at most `max_restarts` times. A
  request is retried at most `request_retries` times, then gets a `replica_failed` result; when no
  replica is left, every waiting request gets one.
- Out of memory with tp_size 1, static scheduler: the rank frees the batch and retries it one
  request at a time; a request that still does not fit gets an `out_of_memory` result
  (`out_of_memory`). Continuous scheduler, any tp_size: the rank rolls the step back (every row to
  its length before it) and answers "out of memory"; the pool proceeds as below.
- Out of memory with tp_size > 1: no rank retries on its own (its peers may be waiting for it in
  a collective). The rank frees what it can and answers "out of memory"; the pool decides. If
  every rank answered (all out of memory, or some with results) the group is checked with one
  all-reduce and kept; if some rank is still running `rank_grace_s` after the first answer, it is
  stuck in a collective: the replica is killed and rebuilt. Either way a batch of several requests
  is split: each request goes back to the front of the queue to run alone (this does not count
  as a retry; continuous: the ranks drop them, and each is recomputed from its prompt, counted in
  its result's `preemptions`); a request that ran alone gets `out_of_memory` results.
- A rank that raises anything else: the batch gets `internal_error` results (the replica is
  killed and rebuilt if a peer is still running after `rank_grace_s`).
- An unexpected exception in the serving loop itself (a bug): the batch gets `internal_error`
  results naming it; the replica is killed and rebuilt if its ranks may still be running the
  batch, and serving goes on. A serving thread that dies anyway fails the batch it held and, when
  it was the last one, every waiting request (`internal_error`); `submit` then answers at once.
- `run` waits for results by polling: when requests are in flight and no serving thread is alive
  it raises `EngineError` instead of blocking forever.
"""
from pipeline.engine.errors import EngineError, EngineStartupError
from pipeline.engine.pool import ReplicaPool
from pipeline.engine.worker import SHM_PREFIX, RankWorker

__all__ = ["EngineError", "EngineStartupError", "ReplicaPool", "RankWorker", "SHM_PREFIX"]
