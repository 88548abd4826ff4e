"""The evaluation run: every (variant, length, task) of an `EvalConfig`, written as it goes
(results.json, results.csv), then the plots and the summary. A DCA variant whose result is provably
the plain model's is not recomputed (`equivalence_key`); a stopped run resumes."""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from evaluation.config import EvalConfig, Variant
from evaluation.report import write_plots, write_summary
from evaluation.runners import (
    InProcessRunner, ReplicaRunner, perplexity_summary, rank_model_info, shared_prefix, shared_prefix_nll,
)
from evaluation.texts import (
    PASSKEY_INSTRUCTION, PASSKEY_NEEDLE, PASSKEY_QUESTION, REPEAT_FILLER, REPO_ROOT, build_passkey_prompt, encode,
    make_passkey, passkey_correct, perplexity_windows, read_book,
)
from pipeline.config.model import dca_config_of_settings

# --------------------------------------------------------------------------------------------
# The evaluation run


def resolved_dca(variant: Variant, max_position_embeddings: int):
    """The DCAConfig of a variant on a model, or None for the plain model."""
    return dca_config_of_settings(variant.dca, max_position_embeddings)


def equivalence_key(dca_config, length: int, extra_tokens: int = 0):
    """Variants with equal keys give identical results on sequences of `length` (+ decoded) tokens.

    DCA equals plain attention for sequences up to chunk_size + 1 tokens (spec section 2), and the
    temperature factor is 1 for prompts up to pretraining_length (section 5).
    """
    if dca_config is None or length + extra_tokens <= dca_config.chunk_size + 1:
        return ("plain",)
    alpha = dca_config.temperature_alpha if length > dca_config.pretraining_length else 0.0
    return ("dca", dca_config.pretraining_length, dca_config.chunk_size, dca_config.local_window, alpha)


def git_commit(repo: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "evaluation", "jobs/evaluate.py", "dca"],
            cwd=repo, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ResultWriter:
    """Keeps the results of a run and rewrites results.json / results.csv after every record."""

    CSV_FIELDS = (
        "task", "variant", "length", "depth", "seed", "filler", "window", "book", "start",
        "ppl", "ppl_last_quarter", "nll", "nll_last_quarter", "key", "answer", "correct",
        "needle_start", "seconds", "same_as", "shared_prefix",
    )

    def __init__(self, out_dir: str | os.PathLike, meta: dict, write: bool = True):
        self.out_dir = Path(out_dir)
        self.write = write
        if write:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        if not self.write:
            return
        data = {"meta": self.meta, "records": self.records}
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.out_dir / "results.json")
        with open(self.out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in self.records:
                writer.writerow(r)


def resumed_meta(old: dict, meta: dict, out_dir: str | os.PathLike) -> dict:
    """Folds the meta of the run being resumed into `meta` (in place) and refuses a resume that
    would mix incomparable records: another model, or a variant name now meaning other settings.

    The variants of both runs stay described (a stage may run a subset of them), and the earlier
    run's commit, dates and config go to `previous_runs`."""
    if old.get("model") is not None and old["model"] != meta["model"]:
        raise ValueError(f"{out_dir} holds results of model {old['model']!r}; cannot resume it with {meta['model']!r}")
    new_variants = json.loads(json.dumps(meta["variants"], default=str))
    for name, settings in old.get("variants", {}).items():
        if name in new_variants and new_variants[name] != settings:
            raise ValueError(
                f"{out_dir}: variant {name!r} was run with {settings}, now {new_variants[name]}; "
                "give the new settings another variant name or use another output directory"
            )
    meta["previous_runs"] = old.get("previous_runs", []) + [
        {k: old.get(k) for k in ("commit", "date", "finished", "torch_threads", "variants", "config")}
    ]
    meta["variants"] = {**old.get("variants", {}), **meta["variants"]}
    return meta


def record_identity(record: dict) -> tuple:
    """What makes a record unique in a run: task, variant, length and the sample's coordinates."""
    return tuple(record.get(k) for k in ("task", "variant", "length", "window", "depth", "seed", "filler"))


def _samples(config: EvalConfig, tokenizer, book_ids, task: str, length: int, log):
    """-> list of (info dict, token ids, tokens generated after the ids) for one task and length."""
    if task == "perplexity":
        windows = perplexity_windows(book_ids, config.books, length, config.windows)
        if len(windows) < config.windows:
            log(f"perplexity {length}: only {len(windows)} windows of the books are long enough")
        return [(dict(window=w, book=book, start=start), ids, 0) for w, (book, start, ids) in enumerate(windows)]
    samples = []
    # Filler outermost: the first rounds of a breadth-first run cover every depth with one filler.
    for filler in config.fillers:
        for seed in config.seeds:
            for depth in config.depths:
                key = make_passkey(seed)
                prompt = build_passkey_prompt(tokenizer, length, depth, key, kind=filler, seed=seed, book_ids=book_ids)
                info = dict(depth=depth, seed=seed, filler=filler, key=key, needle_start=prompt.needle_start)
                samples.append((info, prompt.input_ids, config.answer_tokens))
    return samples


def run_evaluation(
    config: EvalConfig, out_dir: str | os.PathLike, *, model=None, tokenizer=None, resume: bool = False,
    runners: dict | None = None, write: bool = True, log=print,
) -> dict:
    """Runs every task of `config`, writes results.json, results.csv and the plots to `out_dir`.

    `resume`: keep the records of an earlier (stopped) run in `out_dir` and compute only the rest.
    `runners`: {variant name: runner} serving the variants elsewhere (`run_evaluation_tp`: engine
    replicas); then `model` is unused. Otherwise each variant is a copy of `model` (with its DCA
    settings) in this process, run through the engine's rank-side code.
    `write`: False to compute without writing files.

    `model` / `tokenizer` may be passed in (tests: a tiny random model); otherwise they are loaded
    from `config.model`, once. Returns the results dict (meta + records).
    """
    import copy

    import torch

    from dca import apply_dca

    if config.threads:
        torch.set_num_threads(config.threads)
    t_load = time.time()
    if tokenizer is None:
        from pipeline.engine.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    if runners is not None:
        info = runners[config.variants[0].name].info()
    else:
        if model is None:
            from pipeline.engine.models import load_model

            model = load_model(dataclasses.replace(config.model, dca=None), device=config.device)
        model.eval()
        info = rank_model_info(InProcessRunner(model, tokenizer).ctx)
    max_pos = info["max_position_embeddings"]
    log(f"model loaded in {time.time() - t_load:.1f}s (max_position_embeddings={max_pos})")

    dca_configs = {v.name: resolved_dca(v, max_pos) for v in config.variants}
    if runners is None:
        runners = {}
        for v in config.variants:
            variant_model = model if dca_configs[v.name] is None else apply_dca(copy.deepcopy(model), dca_configs[v.name])
            runners[v.name] = InProcessRunner(variant_model, tokenizer)

    meta = {
        "model": config.model.model,
        "model_type": info["model_type"],
        "max_position_embeddings": max_pos,
        # Of the model, or of one tensor-parallel rank's shard (tp_size > 1).
        "parameters": info["parameters"],
        "dtype": info["dtype"],
        "device": info["device"],
        "tp_size": info.get("tp_size", 1),
        # Passkey answers come from the engine's generation path (pipeline.engine).
        "generation": "pipeline.engine" + (" replica" if info.get("tp_size", 1) > 1 else " in process"),
        "variants": {
            v.name: {"dca": dca_configs[v.name].to_dict() if dca_configs[v.name] else None,
                     "max_length": v.max_length, "native_only": v.native_only}
            for v in config.variants
        },
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "prompt": {"instruction": PASSKEY_INSTRUCTION, "needle": PASSKEY_NEEDLE, "question": PASSKEY_QUESTION,
                   "repeat_filler": REPEAT_FILLER},
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "finished": None,
    }
    writer = ResultWriter(out_dir, meta, write=write)
    if resume and (Path(out_dir) / "results.json").is_file():
        previous = json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8"))
        writer.records = list(previous.get("records", []))
        resumed_meta(previous.get("meta", {}), meta, out_dir)
        log(f"resuming: {len(writer.records)} records already in {out_dir}")
    done_ids = {record_identity(r) for r in writer.records}
    book_ids = {b: encode(tokenizer, read_book(b)) for b in config.books}

    # Breadth first: round r holds the r-th sample of every (length, task), so a run stopped
    # early still has every cell covered by its first samples.
    plan = []
    for li, length in enumerate(sorted(config.lengths)):
        for ti, task in enumerate(config.tasks):
            for r, (info, ids, extra) in enumerate(_samples(config, tokenizer, book_ids, task, length, log)):
                plan.append(((r, li, ti), task, length, info, ids, extra))
    plan.sort(key=lambda item: item[0])

    for _, task, length, info, ids, extra in plan:
        active = [
            v for v in config.variants
            if (v.max_length is None or length <= v.max_length) and (not v.native_only or length <= max_pos)
        ]
        done: dict = {}  # equivalence key -> variant computed for this sample
        compute, copies = [], []  # variants to compute; (variant, key) to copy from one computed
        for v in active:
            eq = equivalence_key(dca_configs[v.name], length, extra)
            identity = record_identity({"task": task, "variant": v.name, "length": length, **info})
            if identity in done_ids:
                prior = next(r for r in writer.records if record_identity(r) == identity)
                if not prior.get("same_as"):
                    done.setdefault(eq, v.name)
                continue
            if config.skip_identical and (eq in done or any(eq == k for _, k in compute)):
                copies.append((v, eq))
                continue
            compute.append((v, eq))
        # For the log: the book by its file name (the records keep the path).
        where = {k: os.path.basename(info[k]) if k == "book" else info[k]
                 for k in info if k in ("window", "book", "depth", "seed", "filler")}
        shared, prefix = None, 0
        if task == "perplexity" and config.share_prefix and all(isinstance(runners[v.name], InProcessRunner) for v, _ in compute):
            prefix = shared_prefix([dca_configs[v.name] for v, _ in compute], length)
        if prefix:
            # The plain model first: it runs the whole sequence, the DCA variants continue its cache.
            compute.sort(key=lambda item: dca_configs[item[0].name] is not None)
            shared = shared_prefix_nll([runners[v.name].ctx.model for v, _ in compute], ids, prefix, config.loss_slice)
            log(f"{task} n={length} {where}: {' and '.join(v.name for v, _ in compute[1:])} continue(s) the "
                f"{compute[0][0].name} model's KV cache of the first {prefix:,} tokens (plain attention in each)")
        for i, (v, eq) in enumerate(compute):
            record = {"task": task, "variant": v.name, "length": length, **info}
            t0 = time.time()
            if shared is not None:
                record.update(perplexity_summary(shared.nll[i], length, config.position_bucket))
                record["shared_prefix"] = prefix  # seconds: this variant's own forward only
                seconds = shared.seconds[i]
            elif task == "perplexity":
                record.update(perplexity_summary(runners[v.name].nll(ids, config.loss_slice), length, config.position_bucket))
                seconds = time.time() - t0
            else:
                answer = runners[v.name].answer(ids, config.answer_tokens)
                record.update(answer=answer, correct=passkey_correct(answer, info["key"]))
                seconds = time.time() - t0
            if task == "perplexity":
                what = f"ppl {record['ppl']:.3f} last-quarter {record['ppl_last_quarter']:.3f}"
            else:
                what = f"answer {record['answer']!r} key {info['key']} correct={record['correct']}"
            record["seconds"] = round(seconds, 2)
            record["same_as"] = None
            done[eq] = v.name
            done_ids.add(record_identity(record))
            writer.add(record)
            log(f"{task} n={length} {v.name} {where}: {what} ({record['seconds']:.1f}s)")
        for v, eq in copies:
            record = {"task": task, "variant": v.name, "length": length, **info}
            src = next(r for r in writer.records if record_identity(r) == record_identity({**record, "variant": done[eq]}))
            copied = {k: src[k] for k in src if k not in ("variant", "same_as", "seconds")}
            writer.add({**copied, "variant": v.name, "same_as": done[eq], "seconds": 0.0})
            done_ids.add(record_identity(record))
    writer.meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    writer.flush()
    results = {"meta": writer.meta, "records": writer.records}
    if write:
        write_plots(results, out_dir)
        write_summary(results, out_dir)
    return results


# --------------------------------------------------------------------------------------------
# Tensor parallelism: each variant served by an engine replica (Ray actors, DeepSpeed AutoTP)


def run_evaluation_tp(
    config: EvalConfig, out_dir: str | os.PathLike, tp_size: int, *, resume: bool = False, tokenizer=None
) -> dict:
    """`run_evaluation` with every variant served by an engine replica of `tp_size` ranks
    (`pipeline.engine.ReplicaPool`: the production rank workers, DeepSpeed AutoTP over gloo on
    CPU, nccl on CUDA): passkey answers are engine requests, perplexity runs on the ranks' shards.
    Starts a private local Ray when none is initialised (and stops it at the end).

    Every variant holds its own replica (DCA is applied before sharding, as the engine does), so
    memory grows with the number of variants: keep few of them for large models.
    """
    import ray

    from pipeline.config.engine import EngineConfig
    from pipeline.engine import ReplicaPool
    from pipeline.runtime.cluster import start_local_ray

    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    started = not ray.is_initialized()
    if started:
        cpus = config.threads or 1
        start_local_ray(max(os.cpu_count() or 1, tp_size * cpus * len(config.variants)), log_to_driver=False)
    pools = {}
    try:
        for v in config.variants:
            spec = dataclasses.replace(config.model, dca=v.dca)
            engine = EngineConfig(
                model_spec=spec, tp_size=tp_size, max_input_tokens=max(config.lengths) + config.answer_tokens,
                cpus_per_rank=config.threads or 1, device=config.device or "auto", request_timeout_s=None,
            )
            pools[v.name] = ReplicaPool(engine).start()
        if tokenizer is None:
            from pipeline.engine.models import load_tokenizer

            tokenizer = load_tokenizer(config.model)
        runners = {name: ReplicaRunner(pool) for name, pool in pools.items()}
        return run_evaluation(dataclasses.replace(config, threads=None), out_dir, runners=runners, tokenizer=tokenizer,
                              resume=resume, log=lambda m: print(m, flush=True))
    finally:
        for pool in pools.values():
            pool.shutdown()
        if started:
            ray.shutdown()
