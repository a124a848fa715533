"""embed-archive: neural embeddings of every recording in a bioacoustic archive, on a laptop or a Ray cluster.

    embed-archive demo [DIR]                      write the synthetic demo archive
    embed-archive run CONFIG [--set k=v ...]      run a job (local Ray, or compute.address)
    embed-archive inspect OUTPUT_URI              what an output root holds
    embed-archive list-models                     the backbone registry
    embed-archive describe-model NAME             one backbone in detail
    embed-archive cache-weights URI FILE          pre-fill the weights cache (offline use)
    embed-archive bench                           the benchmark (BENCHMARKS.md)
    embed-archive submit | status | logs | stop   a job on a Ray cluster, through Ray Jobs

Exit status of ``run``: 0 every recording embedded; 1 the job failed; 2 refused before any
work (bad config, no inputs, model or weights, another run writing the namespace);
3 finished, but some recordings failed (see the errors table; ``--partial-ok`` makes it 0);
4 stopped early because failures passed ``run.max_failed_fraction``; 15 stopped by SIGTERM
(``embed-archive stop``, a scheduler); 130 interrupted (Ctrl-C). A stopped run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.errors import (
    EXIT_ABORTED,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    CheckpointMismatchError,
    ConfigError,
    JobAborted,
    MissingDependencyError,
    NamespaceBusyError,
    NoInputsError,
    PipelineError,
    UnknownModelError,
    WeightsUnavailableError,
    from_ray,
)

log = logging.getLogger("pipeline.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # what a stopped run left is in its record, and resumes
        print("embed-archive: interrupted" + (f" (SIGINT); {_KEPT}" if args.func is cmd_run
                                              else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as err:
        # SIGTERM (`embed-archive stop`, a scheduler) ends a run with SystemExit(15): said
        # as Ctrl-C is, not left to Ray's dump of the signal's C++ stack as the last lines.
        if err.code == signal.SIGTERM and args.func is cmd_run:
            print(f"embed-archive: stopped by SIGTERM; {_KEPT}", file=sys.stderr)
        raise
    except JobAborted as err:
        print(f"embed-archive: stopped: {err}", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as err:
        refused = _refusal(err)
        if refused is not None:
            print(f"embed-archive: error: {refused}", file=sys.stderr)
            return EXIT_CONFIG
        if not isinstance(err, PipelineError):
            raise
        print(f"embed-archive: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE


# What a stopped run leaves: its committed shards (its record counts them), and the rest
# for the next run.
_KEPT = "the shards committed stay, and a rerun resumes"


def _refusal(err: Exception) -> str | None:
    """The one-line message of an error that means "refused" (bad config, no inputs, unknown
    model or its missing extra, weights, a busy namespace, credentials); None for any other
    error.

    A bucket that refuses these credentials (403), or none found, gets one line saying so,
    not a traceback through fsspec and botocore."""
    if isinstance(err, (ConfigError, NoInputsError, UnknownModelError, MissingDependencyError,
                        WeightsUnavailableError, CheckpointMismatchError, NamespaceBusyError)):
        return str(err)
    from pipeline import storage

    return storage.why(err) if storage.access_refused(err) else None


def _parser() -> argparse.ArgumentParser:
    from pipeline.cluster import add_cluster_commands

    summary, _, exits = __doc__.partition("\nExit status")
    parser = argparse.ArgumentParser(prog="embed-archive", description=summary.split("\n")[0],
                                     epilog="Exit status" + exits.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an embedding job", description=(
        "Run an embedding job. Every config key, its default and meaning: README.md,\n"
        "'Run a job' (and the docstrings of pipeline/config.py); a bad one is refused\n"
        "before any work, naming it, exit 2."),
        epilog="Exit status" + exits.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job config YAML (sections input, audio, windows, model, "
                                  "compute, output, run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set model.batch_size=8")
    p.add_argument("--partial-ok", action="store_true",
                   help="exit 0, not 3, when the job finished and some recordings failed (each "
                        "a row of the errors table): for schedulers that retry any non-zero "
                        "exit on fresh machines (a KubeRay RayJob, Airflow), where a retry "
                        "would only skip every committed shard")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="write the synthetic demo archive")
    p.add_argument("directory", nargs="?", default="demo_archive",
                   help="folder to write it in (default: demo_archive): a new or empty "
                        "one, or one the demo wrote before")
    p.add_argument("--seed", type=int, default=7,
                   help="random seed of the synthetic recordings (default: 7)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="show what an output root holds")
    p.add_argument("output_uri")
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                   metavar="KEY=VALUE", help="fsspec option for the output filesystem")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--jobs", default=argparse.SUPPRESS, type=_job_count, metavar="N|all",
                   help="list the latest N runs, or all (default 20; --json has all)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("list-models", help="list registered backbones")
    p.set_defaults(func=cmd_list_models)

    p = sub.add_parser("describe-model", help="describe one backbone")
    p.add_argument("name", help="a registry name (see list-models), an entry-point name, or "
                                "module.path:ClassName")
    p.set_defaults(func=cmd_describe_model)

    p = sub.add_parser("cache-weights", help="put a local checkpoint in the cache under a URI")
    p.add_argument("uri", help="the URI the config names (e.g. hf://EarthSpeciesProject/...)")
    p.add_argument("file", help="local copy of that checkpoint")
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                   metavar="KEY=VALUE", help="the endpoint the config's model.storage_options "
                   "name (endpoint_url=..., client_kwargs={endpoint_url: ...}): the copy is "
                   "found by jobs that use that store")
    p.set_defaults(func=cmd_cache_weights)

    from pipeline.bench import add_bench_command

    add_bench_command(sub)
    add_cluster_commands(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    with _sigterm_exits():
        return _run(args)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (`embed-archive stop`, a scheduler's cancel) ends ``run`` with SystemExit(15)
    from its start, as the handler ``ray.init`` installs does once Ray runs. Before it (the
    weights fetched, a manifest looked up, the markers read: minutes on a large archive)
    Python's default killed the driver: exit 143, and a lease taken was left held for the
    next run to wait out. The previous handler is back afterwards, for in-process callers."""
    if threading.current_thread() is not threading.main_thread():  # signals are the main's
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import JobConfig

    cfg = JobConfig.load(args.config, args.overrides)
    logging.getLogger().setLevel(cfg.run.log_level)
    from pipeline.job import EmbeddingJob, failure_message

    job = EmbeddingJob(cfg)
    job.prepare()  # what it refuses (config, inputs, model, weights, a busy namespace): exit 2
    try:
        summary = job.run()
    except BaseException as err:
        if job.summary is not None:  # what it committed before it stopped or failed
            with contextlib.suppress(Exception):  # never in place of the error itself
                print(job.summary.render())
        # Work had started: whatever stopped it (a lease lost, a checkpoint changed under an
        # actor, a bucket refusing a write, a model's error in an actor) is a failure, exit 1,
        # said in one line as the job record says it: an error Ray hands on carries the
        # worker's whole traceback as its text, which is for the log at DEBUG, not the last
        # lines. Ctrl-C, SIGTERM and the failure budget have exit statuses of their own (main).
        if not isinstance(err, Exception) or isinstance(err, JobAborted):
            raise
        log.debug("the run failed", exc_info=err)
        in_ray = from_ray(err)
        said = None if in_ray else _refusal(err)
        if said is None and isinstance(err, PipelineError) and not in_ray:
            said = str(err)
        print(f"embed-archive: failed: {said or failure_message(err)}", file=sys.stderr)
        return EXIT_FAILURE
    print(summary.render())
    if args.partial_ok and summary.exit_code == EXIT_SOME_FAILED:
        return EXIT_OK
    return summary.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import demo_archive_written, demo_files_present, write_demo_archive

    kept = demo_archive_written(args.directory, seed=args.seed)
    # Only an archive written over (another seed, a file missing) is new to a job that
    # embedded the one before: said on a first write, the warning read as if it were.
    over = not kept and demo_files_present(args.directory)
    try:
        paths = write_demo_archive(args.directory, seed=args.seed)
    except OSError as err:  # a file where the folder should be, no permission, a full disk
        raise ConfigError(f"cannot write the demo archive in {args.directory}: "
                          f"{err.strerror or err}", "directory") from err
    if kept:
        print(f"{len(paths)} recordings and manifest.csv in {args.directory}: kept as they "
              f"were, written with seed {args.seed} before (a rerun of the job resumes)")
    elif over:
        print(f"{len(paths)} recordings and manifest.csv written in {args.directory} (seed "
              f"{args.seed}; written again, they are new recordings to a job that embedded "
              "them before)")
    else:
        print(f"{len(paths)} recordings and manifest.csv written in {args.directory} (seed "
              f"{args.seed})")
    return 0


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` flags as fsspec options, each value read as YAML
    (``anon=true``, ``client_kwargs={endpoint_url: http://...}``); ConfigError names a bad
    one without showing its value (it may be a secret)."""
    import yaml

    from pipeline.config import parse_yaml, plain

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: expected KEY=VALUE, e.g. anon=true",
                              "--storage-option")
        try:
            options[key.strip()] = plain(parse_yaml(value)) if value.strip() else ""
        except yaml.YAMLError:  # the value is never shown: it may be a secret
            raise ConfigError(f"{key.strip()}=***: the value is not valid YAML (quote it: "
                              f"--storage-option '{key.strip()}=\"...\"')",
                              "--storage-option") from None
    return options


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.catalog import load_catalog, render
    from pipeline.config import check_store

    check_store(args.output_uri, "output_uri")
    options = parse_storage_options(args.storage_options)
    catalog = load_catalog(args.output_uri, options)
    if args.json:
        print(json.dumps({"root": catalog.root, "namespaces": [ns.__dict__ for ns in catalog.namespaces],
                          "jobs": catalog.jobs}, indent=2, default=str))
    else:
        print(render(catalog, **({"jobs": args.jobs} if "jobs" in args else {})))
    return 0


def _job_count(text: str) -> int | None:
    """``inspect --jobs``: a count of runs, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a number of runs or 'all', got {text!r}")
    return count


def cmd_list_models(args: argparse.Namespace) -> int:
    from pipeline.models import describe_model, list_models

    print(f"{'name':<36} {'family':<13} {'rate':>6} {'dim':>5} {'layers':>6}  weights")
    broken = 0
    for name in list_models():
        try:
            d = describe_model(name)
        except Exception as err:  # noqa: BLE001 - one installed plugin that cannot load hides no other
            broken += 1
            print(f"{name:<36} (cannot be loaded: {err})")
            continue
        print(f"{d['name']:<36} {d['family']:<13} {d['sample_rate_hz']:>6} "
              f"{d['embedding_dim']:>5} {len(d['layers']):>6}  {d.get('weights_uri') or '(none: random or a URI)'}")
    if broken:
        print(f"embed-archive: {broken} installed backbone(s) cannot be loaded (above)",
              file=sys.stderr)
    return EXIT_FAILURE if broken else 0


def cmd_describe_model(args: argparse.Namespace) -> int:
    from pipeline.models import describe_model

    print(json.dumps(describe_model(args.name), indent=2, default=str))
    return 0


def cmd_cache_weights(args: argparse.Namespace) -> int:
    from pipeline import redact
    from pipeline.models.weights import cache_weights

    result = cache_weights(args.uri, args.file, parse_storage_options(args.storage_options))
    print(f"cached {args.file} for {redact.uri(args.uri)}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
