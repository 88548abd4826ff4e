"""Shared command line of the jobs: flags, --config FILE, paths, exit codes.

Precedence: built-in defaults < --config FILE (YAML or JSON, keys = flag names with underscores)
< flags given on the command line.

Paths: run locally, relative paths are resolved against the current directory. Under
`ray job submit --working-dir .`, the entrypoint runs inside an unpacked copy of the working
directory in Ray's session folder: a relative --output would land there and be lost, so it is
rejected; relative --input / --config / --model paths resolve inside that copy (files under the
working directory are uploaded with it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.job import under_ray_job
from pipeline.models import ModelSpec

# Config-file keys and flags that map onto JobConfig fields under another name.
_RENAMED = {"input": "input_path", "output": "output_dir", "templates": "templates_file"}
# Keys that go into the ModelSpec rather than the JobConfig.
_MODEL_KEYS = ("model", "dtype", "dca", "attn_implementation")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_common_flags(parser: argparse.ArgumentParser, *, task: str | None) -> None:
    g = parser.add_argument_group("common")
    g.add_argument("--input", help="Parquet file, directory or glob; local or s3://, gs:// (required)")
    g.add_argument("--output", help="output directory (absolute under ray job submit) (required)")
    g.add_argument("--model", help="'smollm2' (default, embedded), a Hugging Face directory or a .gguf file")
    g.add_argument("--tp", type=int, help="tensor-parallel ranks per replica (default 1)")
    g.add_argument("--replicas", type=int, help="model replicas (default 1)")
    g.add_argument("--max-input-tokens", type=int, help="prompt limit; longer documents are truncated (default 8192)")
    g.add_argument("--max-new-tokens", type=int, help="tokens generated per output row at most (default 256)")
    g.add_argument("--config", metavar="FILE", help="YAML/JSON file with any of these options (flags override it)")
    g = parser.add_argument_group("input and prompts")
    g.add_argument("--id-column", help="document id column (default id)")
    g.add_argument("--text-column", help="document text column (default text)")
    if task == "qa":
        g.add_argument("--question-column",
                       help="'questions' (list<string>, default) or 'question' (string) column")
    g.add_argument("--templates", metavar="FILE", help="YAML/JSON prompt templates overriding the defaults")
    g.add_argument("--truncation", choices=["middle", "end"],
                   help="over-long documents: keep beginning and end (middle, default) or the beginning (end)")
    g.add_argument("--base-template", dest="use_chat_template", action="store_const", const=False,
                   help="use the plain base-model template even when the tokenizer has a chat template")
    g = parser.add_argument_group("model and engine")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    g.add_argument("--no-dca", dest="dca", action="store_const", const="off",
                   help="run the model without Dual Chunk Attention")
    g.add_argument("--kv-cache-dtype", choices=["auto", "int8"], help="engine: KV cache storage (default auto)")
    g.add_argument("--prefill-block", type=_prefill_block,
                   help="engine: prompt tokens per prefill forward, 'chunk' (one DCA chunk) or N (default one shot)")
    g.add_argument("--max-batch-tokens", type=int, help="engine: tokens per batch inside a replica")
    g.add_argument("--max-batch-size", type=int, help="engine: requests per batch inside a replica")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], help="engine: default auto (cuda when the cluster has GPUs)")
    g.add_argument("--cpus-per-rank", type=int,
                   help="CPUs and torch threads per rank (default: local Ray: cores / ranks; cluster: 1)")
    g.add_argument("--seed", type=int, help="sampling seed (generation is greedy unless do_sample in --config)")
    g = parser.add_argument_group("job control")
    g.add_argument("--max-in-flight", type=int, help="requests inside the engine at once (default 4 per replica)")
    g.add_argument("--schedule-window", type=int,
                   help="documents reordered longest-first at a time (default 4 x max-in-flight)")
    g.add_argument("--max-error-fraction", type=float, help="failure budget (default 0.1)")
    g.add_argument("--part-rows", type=int, help="rows per committed output part (default 256)")
    g.add_argument("--overwrite", action="store_const", const=True,
                   help="replace an output directory that holds another job's results")
    g.add_argument("--job-id", help="label written to every row (default: derived from the config)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    g.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _prefill_block(text: str) -> int | str:
    if text == "chunk":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'chunk' or a number of tokens, got {text!r}") from None


def load_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _resolve(path: str | None, what: str, *, allow_relative_in_ray_job: bool) -> str | None:
    if path is None or "://" in path:
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    if under_ray_job() and not allow_relative_in_ray_job:
        raise ValueError(
            f"{what} {path!r} is relative: under `ray job submit --working-dir` it would resolve inside a "
            f"temporary copy of the working directory ({os.getcwd()}) and be lost. Give an absolute path on "
            "storage the Ray head node can write (a shared mount on a multi-node cluster)."
        )
    return os.path.abspath(path)


def build_values(args: argparse.Namespace, *, required=("input", "output")) -> dict:
    """Merged option values (defaults < --config < flags), paths resolved."""
    values: dict = {}
    if args.config:
        config_path = _resolve(args.config, "--config", allow_relative_in_ray_job=True)
        values.update(load_config_file(config_path))
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "verbose"):
            values[key] = value
    missing = [k for k in required if not values.get(k)]
    if missing:
        raise ValueError("missing " + ", ".join("--" + k for k in missing) + " (flag or --config key)")
    values["input_as_given"] = values.get("input")
    values["input"] = _resolve(values.get("input"), "--input", allow_relative_in_ray_job=True)
    values["output"] = _resolve(values.get("output"), "--output", allow_relative_in_ray_job=False)
    if values.get("templates"):
        values["templates"] = _resolve(values["templates"], "--templates", allow_relative_in_ray_job=True)
    return values


def job_config_kwargs(values: dict) -> dict:
    """Option values -> JobConfig keyword arguments (with a ModelSpec)."""
    values = dict(values)
    values.pop("input_as_given", None)
    spec_values = dict(values.pop("model_spec", None) or {})
    for key in _MODEL_KEYS:
        if key in values:
            spec_values[key] = values.pop(key)
    if spec_values.get("dca") == "off":
        spec_values["dca"] = None
    model = spec_values.get("model")
    if model and model != "smollm2" and not under_ray_job():
        spec_values["model"] = os.path.abspath(os.path.expanduser(model))
    kwargs = {_RENAMED.get(k, k): v for k, v in values.items()}
    import dataclasses

    from pipeline.job import JobConfig

    known = {f.name for f in dataclasses.fields(JobConfig)} - {"task", "model_spec"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        inverse = {v: k for k, v in _RENAMED.items()}
        names = sorted({inverse.get(k, k) for k in known} | set(_MODEL_KEYS) | {"model_spec"})
        raise ValueError(f"unknown option(s) {unknown} (in --config?); known: {', '.join(names)}")
    kwargs["model_spec"] = ModelSpec.from_dict(spec_values)
    if isinstance(kwargs.get("stop"), list):
        kwargs["stop"] = tuple(kwargs["stop"])
    return kwargs


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def report(summary: dict) -> None:
    d, t = summary["documents"], summary["tokens"]
    print(
        f"{summary['task']} job {summary['job_id']}: {summary['status']} in {summary['wall_s']:.1f} s; "
        f"documents ok {d['ok']}, error {d['error']}, skipped {d['skipped']}, already committed "
        f"{d['already_committed']} (truncated {d['truncated']}); "
        f"tokens in {t['prompt']}, out {t['output']}\n"
        f"output:  {summary['output_dir']}\nmetrics: {summary['metrics_files'].get('metrics')}"
        + (f"\nplot:    {summary['metrics_files']['plot']}" if "plot" in summary["metrics_files"] else ""),
        flush=True,
    )


def task_main(task: str, doc: str, argv=None) -> None:
    """The whole of `python -m jobs.summarize` / `jobs.qa`: flags -> JobConfig -> run -> report."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{task}",
                                     description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, task=task)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.job import JobConfig, run_job

    config = JobConfig(task=task, **job_config_kwargs(build_values(args)))
    report(run_job(config))


def run_main(main) -> None:
    """Runs a job's main() with user-facing errors as one line and these exit codes:
    0 done; 1 the job failed (failure budget, engine); 2 bad input, output, model or settings,
    before any model work; 128 + signal when stopped (143 SIGTERM, 130 SIGINT) after committing
    the finished documents and writing the metrics: rerun the same command to resume."""
    import signal

    from pipeline.engine import EngineError
    from pipeline.io import InputError
    from pipeline.job import JobFailed, JobStopped
    from pipeline.output import OutputError

    # Until the job installs its own handlers (pipeline.job._StopSignals): exit quietly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except JobStopped as e:
        print(f"job stopped by {e}: finished documents are committed; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted before the job started; nothing was written", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except JobFailed as e:
        print(f"job failed: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    except (InputError, OutputError, EngineError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
