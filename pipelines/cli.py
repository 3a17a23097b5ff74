"""The kftune command: compile the pipeline, run it on this machine, or submit it to a cluster.

    kftune compile [--profile gke-gpu|cpu|FILE]  writes the KFP IR YAML with a cluster profile's settings
    kftune run-local [name=value ...]            runs the compiled pipeline with KFP's local runner
    kftune submit --host URL [name=value ...]    uploads it to Kubeflow Pipelines and starts a run
    kftune params                                lists every pipeline parameter: type, default, description
    kftune predict MODEL_URI IMAGE...            classifies images with an exported version (offline)
    kftune serve MODEL_URI [--port N]            serves an exported version over KServe's V1 and V2 REST
    kftune runs [open [RUN] | compare RUN RUN...]  lists local runs; opens a run's page; compares runs

run-local checks every parameter before anything runs, runs the very pipeline
a cluster runs (the compiled YAML) with kfp.local's SubprocessRunner, prints
one line as each task starts and ends (each task's full log goes to the run
folder's logs/; --verbose streams them), and ends with a table: accuracy, size
and time per stage.

Exit codes: 0 success; 1 the run failed, or the Kubeflow Pipelines API could
not be reached; 2 a mistake in the command or its parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
COMPILED = PACKAGE_DIR / "compiled" / "tuning_pipeline.yaml"


def compile_pipeline(output: str | Path = COMPILED, profile: str | Path = "gke-gpu") -> Path:
    """Compiles the pipeline with a cluster profile (pipelines/cluster.py); the checked-in YAML has the default."""
    from kfp import compiler

    from pipelines import cluster
    from pipelines.tuning_pipeline import make_pipeline

    pipeline = cluster.build(make_pipeline, cluster.Profile.load(profile))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output))
    return output


def check_compiled(compiled: str | Path = COMPILED, profile: str | Path = "gke-gpu", *, shown: int = 12) -> str:
    """'' when ``compiled`` is what compiling with ``profile`` writes now; else a short summary of the difference.

    Compiles to a temporary folder and compares, so ``compiled`` itself is never written: CI fails on a
    stale checked-in YAML instead of quietly submitting or shipping one that the code no longer makes.
    """
    import difflib
    import tempfile

    from pipelines import cluster

    compiled = Path(compiled)
    with tempfile.TemporaryDirectory(prefix="kftune-check-") as folder:
        fresh = compile_pipeline(Path(folder) / compiled.name, profile).read_text()
    fix = ("run `make compile` and commit the result" if compiled.resolve() == COMPILED.resolve()
           and str(profile) == cluster.DEFAULT_PROFILE else f"run `kftune compile --profile {profile} --output {compiled}`")
    if not compiled.exists():
        return f"`{compiled}` does not exist: {fix}."
    current = compiled.read_text()
    if fresh == current:
        return ""
    diff = list(difflib.unified_diff(current.splitlines(), fresh.splitlines(), f"{compiled} (as it is)",
                                     f"{compiled} (compiled now)", n=0, lineterm=""))[2:]
    removed = sum(line.startswith("-") for line in diff)
    added = sum(line.startswith("+") for line in diff)
    lines = [f"`{compiled}` is stale: `kftune compile --profile {profile}` writes it now with {removed} line(s) "
             f"removed and {added} added; the first changes:", *diff[:shown]]
    if len(diff) > shown:
        lines.append(f"... and {len(diff) - shown} more diff line(s)")
    if any(line[1:].lstrip().startswith("image:") for line in diff if line[:1] in "+-"):
        # The one input that is not in the repository: the images come from the environment.
        lines.append("(the images come from KFTUNE_REGISTRY, KFTUNE_TAG, KFTUNE_IMAGE and KFTUNE_CPU_IMAGE; "
                     "the checked-in YAML is compiled with none of them set: unset them to check it)")
    lines.append(f"{fix[0].upper()}{fix[1:]}.")
    return "\n".join(lines)


def default_output(profile: str) -> Path:
    """The checked-in YAML for the default profile; build/ for the others, so the checked-in one stays current."""
    from pipelines import cluster

    if profile == cluster.DEFAULT_PROFILE:
        return COMPILED
    return Path("build") / f"tuning_pipeline-{Path(str(profile)).stem}.yaml"


# ---------------------------------------------------------------- parameters

_CASTS = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "STRING": str, "BOOLEAN": None}


def pipeline_parameters(compiled: str | Path = COMPILED) -> dict[str, dict]:
    """The pipeline's parameters (type and default), read from the compiled YAML."""
    spec = next(yaml.safe_load_all(Path(compiled).read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]


def parse_arguments(pairs: list[str], compiled: str | Path = COMPILED) -> dict:
    """``name=value`` pairs, typed as the pipeline declares them."""
    from kftune.errors import InputError

    declared = pipeline_parameters(compiled)
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise InputError(f"`{pair}` is not name=value: write for example max_trials=4.")
        if name not in declared:
            raise InputError(f"unknown pipeline parameter `{name}`; the parameters are: {', '.join(sorted(declared))}.")
        kind = declared[name]["parameterType"]
        try:
            if kind == "BOOLEAN":
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                out[name] = raw.lower() == "true"
            else:
                out[name] = _CASTS[kind](raw)
        except ValueError:
            raise InputError(f"pipeline parameter `{name}` must be {kind.lower().replace('number_', '')}. Received: {raw!r}") from None
    return out


def check_arguments(arguments: dict, compiled: str | Path = COMPILED, *, local: bool = True) -> None:
    """The validation step's own check (kftune.parameters), so bad input stops here, before any work.

    With ``local`` (run-local), a local ``source`` or weights file must exist
    here. For ``submit`` a path names a volume the cluster's pods mount, so the
    validation step checks it there, with the pods' mounts and credentials.
    """
    from kftune import parameters, storage
    from kftune.errors import InputError

    declared = pipeline_parameters(compiled)
    missing = sorted(set(parameters.BY_NAME) - set(declared))
    if missing:
        raise InputError(f"`{compiled}` lacks the parameter(s) {', '.join(missing)}: it was compiled from another "
                         "kftune version. Run `make compile` (or `kftune compile`) again.")
    settings = parameters.validate(arguments)
    if not local:
        return
    for name, uri in (("source", settings.ingest.source), ("weights", settings.finetune.weights)):
        if storage.is_gcs(uri) or "://" in uri or uri in ("imagenet", "none", "") or uri.startswith("bundled:"):
            continue
        if name == "weights" and not settings.finetune.backbone:
            continue
        if not Path(uri).exists():
            raise InputError(f"`{name}` `{uri}` does not exist: check the path.")


# ---------------------------------------------------------------- local run


STAGES = [
    ("validate", ("validate",), None),
    ("ingest", ("ingest",), None),
    ("augment", ("augment",), None),
    ("search", ("search-",), "baseline"),
    ("fine-tune", ("finetune",), "finetuned"),
    ("prune", ("prune",), "pruned"),
    ("  + int8 TFLite", None, "quantized"),
    ("evaluate + gate", ("evaluate", "gate-failed"), None),
    ("export", ("export",), None),
]


def summary(run_dir: Path, timer) -> str:
    """The table printed at the end of a local run: accuracy, size and time per stage.

    ``timer`` has ``seconds``: each task name's total seconds (pipelines/local_runner.py's Console).
    """
    from kftune import report

    evaluations = {}
    for path in run_dir.glob("evaluate*/evaluations"):
        evaluations.update({values["name"]: values for values in json.loads(path.read_text())})
    chosen = None
    for out in run_dir.glob("evaluate*/executor_output.json"):
        chosen = json.loads(out.read_text()).get("artifacts", {}).get("chosen", {}).get("artifacts", [{}])[0].get("metadata", {})
    rows = []
    for stage, prefixes, candidate in STAGES:
        ev = evaluations.get(candidate) if candidate else None
        if prefixes is None:  # made inside another stage's step
            if ev:
                rows.append([stage, f"{ev['accuracy']:.4f}", f"{ev['size_bytes'] / 1024:.0f} KiB",
                             f"{ev['gzip_bytes'] / 1024:.0f} KiB", ""])
            continue
        seconds = sum(s for name, s in timer.seconds.items() if name.startswith(prefixes))
        ran = any(name.startswith(prefixes) for name in timer.seconds)
        rows.append([
            stage,
            f"{ev['accuracy']:.4f}" if ev else "",
            f"{ev['size_bytes'] / 1024:.0f} KiB" if ev else "",
            f"{ev['gzip_bytes'] / 1024:.0f} KiB" if ev else "",
            f"{seconds:.0f} s" if ran else "skipped",
        ])
    rows.append(["total", "", "", "", f"{sum(timer.seconds.values()):.0f} s"])
    table = report.text_table(["stage", "test accuracy", "size", "gzip size", "time"], rows)
    if chosen:
        verdict = (f"chosen: {chosen.get('candidate')} (exported)" if chosen.get("passed")
                   else f"chosen: {chosen.get('candidate')}, NOT exported: {chosen.get('failed_thresholds')}")
        table += f"\n{verdict}"
    return table + f"\nartifacts: {run_dir}"


def without_retries(ir_yaml: str) -> str:
    """The pipeline's IR without its tasks' retry policies, for kfp.local (which honours them).

    The cluster profile retries GPU steps for preempted nodes, with a backoff of
    minutes; on this machine nothing is preempted, and a step that failed fails
    again, so a mistake found by a GPU step would be reported only after three
    retries and seven minutes of waiting.
    """
    import yaml

    def strip(node):
        if isinstance(node, dict):
            node.pop("retryPolicy", None)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)
        return node

    # The IR is one document, or two with kfp-kubernetes' platform spec.
    return yaml.safe_dump_all([strip(document) for document in yaml.safe_load_all(ir_yaml)], sort_keys=False)


def run_local(arguments: dict, pipeline_root: str | Path = "runs", compiled: str | Path = COMPILED, *,
              verbose: bool = False, out=None) -> tuple[Path, str]:
    """Runs the compiled pipeline with kfp.local's SubprocessRunner; returns the run folder and the summary.

    While it runs, one line per task as it starts and ends goes to ``out``
    (stdout), and each task's whole output to the run folder's ``logs/``;
    ``verbose`` streams the tasks' output as kfp.local does.
    """
    from kfp import components, local

    from pipelines import local_runner, runs

    check_arguments(arguments, compiled)
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    # Components declare kftune's image; locally they run in this environment,
    # which holds the same packages, so the runner's warning about it is noise.
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    before = set(pipeline_root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = components.load_component_from_text(without_retries(Path(compiled).read_text()))
    started = time.time()
    with local_runner.console(verbose, out) as console:
        try:
            pipeline(**arguments)
        except BaseException as error:
            runs.record(console, arguments, started=started, error=error)  # the page names the failed step
            raise
    new = sorted((p for p in pipeline_root.iterdir() if p not in before and p.is_dir()), key=lambda p: p.stat().st_mtime)
    run_dir = console.run_dir or (new[-1] if new else pipeline_root)
    page = runs.record(console, arguments, started=started, run_dir=run_dir)
    return run_dir, summary(run_dir, console) + (f"\nrun page: {page}" if page else "")


def main(argv: list[str] | None = None) -> int:
    import kftune
    from kftune import parameters

    parser = argparse.ArgumentParser(prog="kftune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kftune {kftune.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compile,run-local,submit,params,predict,serve,reproduce,runs}")
    compile_cmd = commands.add_parser("compile", help="compile the pipeline to KFP IR YAML",
                                      description="Compiles the pipeline to KFP IR YAML with a cluster profile's settings.")
    compile_cmd.add_argument("--profile", default="gke-gpu",
                             help="cluster profile: gke-gpu (default), cpu, or a profile YAML file (pipelines/profiles/)")
    compile_cmd.add_argument("--output", help=f"default: {COMPILED.relative_to(PACKAGE_DIR.parent)} for gke-gpu, "
                                              "build/tuning_pipeline-<profile>.yaml for the others")
    compile_cmd.add_argument("--check", action="store_true",
                             help="write nothing: exit 0 when the YAML at --output is what compiling writes now, "
                                  "1 with a summary of the difference when it is stale (CI runs this)")
    run_cmd = commands.add_parser(
        "run-local", help="run the compiled pipeline on this machine with kfp.local",
        # Raw, for the parameter table below; so the description is wrapped here.
        description=textwrap.fill(
            "Runs the compiled pipeline with KFP's local runner (kfp.local.SubprocessRunner) on this machine, "
            "after checking every parameter. Prints one line as each task starts and ends, each task's full "
            "log goes to <run folder>/logs/, and a table of accuracy, size and time per step ends the run. "
            "Exit code 0 when it succeeded, 1 when a task failed, 2 for a mistake in the command.", 88),
        epilog="pipeline parameters (name=value):\n" + parameters.help_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run_cmd.add_argument("parameters", nargs="*", metavar="name=value", help="pipeline parameters, e.g. max_trials=4")
    run_cmd.add_argument("--pipeline-root", default="runs", help="where run folders and artifacts go (default: runs)")
    run_cmd.add_argument("--compiled", default=str(COMPILED), help="the compiled pipeline to run")
    run_cmd.add_argument("--verbose", action="store_true",
                         help="stream every task's output (kfp.local's own console) instead of one line per task")
    _add_submit_parser(commands)
    commands.add_parser("params", help="list every pipeline parameter with its type, default and description",
                        description="Lists every pipeline parameter with its type, default and description.")
    _add_serving_parsers(commands)
    _add_reproduce_parser(commands)
    from pipelines import runs

    runs.add_parser(commands)
    args = parser.parse_args(argv)

    from kftune.errors import KftuneError
    from pipelines import local_runner, submit

    try:
        if args.command == "params":
            print(parameters.help_table())
            return 0
        if args.command == "runs":
            return runs.command(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "reproduce":
            from pipelines import reproduce

            return reproduce.reproduce(args.export_uri, pipeline_root=args.pipeline_root,
                                       export_destination=args.export_destination, tolerance=args.tolerance,
                                       compiled=args.compiled, verbose=args.verbose)
        if args.command == "serve":
            from kftune import server

            return server.serve(args.model_uri, port=args.port, name=args.name, host=args.host)
        if args.command == "compile" and args.check:
            output = args.output or default_output(args.profile)
            stale = check_compiled(output, args.profile)
            print(f"kftune: {stale}" if stale else f"kftune: {output} is current (cluster profile {args.profile})",
                  file=sys.stderr if stale else sys.stdout)
            return 1 if stale else 0
        if args.command == "compile":
            output = compile_pipeline(args.output or default_output(args.profile), args.profile)
            print(f"kftune: compiled {output} (cluster profile {args.profile})")
            return 0
        if not Path(args.compiled).exists():
            print(f"kftune: error: `{args.compiled}` does not exist: run `make compile` first.", file=sys.stderr)
            return 2
        if args.command == "submit":
            return _submit(args)
        started = time.time()
        arguments = parse_arguments(args.parameters, args.compiled)
        check_arguments(arguments, args.compiled)
        print(f"kftune: running the pipeline locally, artifacts under {args.pipeline_root}/", flush=True)
        _, table = run_local(arguments, args.pipeline_root, args.compiled, verbose=args.verbose)
        print(f"\n{table}\nwall time: {time.time() - started:.0f} s")
        return 0
    except submit.Unreachable as e:
        print(f"kftune: error: {e}", file=sys.stderr)
        return 1
    except KftuneError as e:
        print(f"kftune: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # kfp.local's failure line names the task; the console showed its log's last lines and where it is.
        print(f"kftune: the pipeline failed: {local_runner.plain(str(e)).splitlines()[0]}", file=sys.stderr)
        return 1


def _add_submit_parser(commands) -> None:
    cmd = commands.add_parser(
        "submit", help="upload the compiled pipeline to Kubeflow Pipelines and start a run",
        description="Uploads the compiled pipeline (a new pipeline, or a new version of it), starts a run in an "
                    "experiment and, with --wait, follows it to the end: exit 0 when it SUCCEEDED, 1 when it FAILED, "
                    "was CANCELED or ran past --timeout, or when no API answered at --host, 2 for a mistake in the command. A bearer token for the API, "
                    "if yours needs one, goes in the KFTUNE_KFP_TOKEN environment variable.")
    cmd.add_argument("parameters", nargs="*", metavar="name=value", help="pipeline parameters, e.g. source=gs://b/data")
    cmd.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                     help="the Kubeflow Pipelines API, e.g. http://localhost:8080 (default: $KF_PIPELINES_ENDPOINT, "
                          "else kfp.Client finds it through the current kubectl context)")
    cmd.add_argument("--compiled", default=str(COMPILED), help="the compiled pipeline to submit")
    cmd.add_argument("--pipeline-name", help="the pipeline's name in Kubeflow (default: the compiled pipeline's name)")
    cmd.add_argument("--version", default="", help="name of the new pipeline version (default: sha256-<YAML hash>, "
                                                   "so an unchanged pipeline reuses its version)")
    cmd.add_argument("--experiment", default="kftune", help="experiment of the run, created if missing (default: kftune)")
    cmd.add_argument("--run-name", default="", help="default: '<pipeline name> <UTC time>'")
    cmd.add_argument("--pipeline-root", default="", help="gs://BUCKET/PREFIX for the run's artifacts "
                                                         "(default: the compiled one, else the cluster's)")
    cmd.add_argument("--service-account", default="", help="Kubernetes service account of the run's pods "
                                                           "(Workload Identity binds it to a Google service account)")
    cmd.add_argument("--namespace", default="", help="the user namespace, on a multi-user Kubeflow")
    cmd.add_argument("--wait", action="store_true", help="follow the run until it ends; non-zero exit unless it SUCCEEDED")
    cmd.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
    cmd.add_argument("--poll", type=float, default=10, help="with --wait: seconds between status checks (default: 10)")


def _add_reproduce_parser(commands) -> None:
    from pipelines import reproduce

    cmd = commands.add_parser(
        "reproduce", help="run the pipeline again with an export's recorded parameters and compare the figures",
        description=reproduce.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("export_uri", metavar="EXPORT_URI", help="a version (<base>/<N>), a base (its newest), or gs://")
    cmd.add_argument("--pipeline-root", default="runs", help="where the rerun's folder goes (default: runs)")
    cmd.add_argument("--export-destination", default=reproduce.DEFAULT_DESTINATION,
                     help=f"the rerun's model base, never the original's (default: {reproduce.DEFAULT_DESTINATION})")
    cmd.add_argument("--tolerance", type=float, default=reproduce.DEFAULT_TOLERANCE,
                     help="largest accuracy difference per candidate that still counts as reproduced "
                          f"(default: {reproduce.DEFAULT_TOLERANCE}, 2 points)")
    cmd.add_argument("--compiled", default=str(COMPILED), help="the compiled pipeline to run")
    cmd.add_argument("--verbose", action="store_true", help="stream every task's output")


def _add_serving_parsers(commands) -> None:
    from kftune import serving

    where = ("MODEL_URI: a version folder (<base>/<N>), a model base (its newest complete version) or a gs:// URI "
             "of either; every file is checked against the version's MANIFEST.json first.")
    cmd = commands.add_parser(
        "predict", help="classify image files with an exported version", description=(
            "Classifies image files (JPEG, PNG, GIF, BMP, WebP; any size, grayscale or colour; a folder stands for "
            "the images in it and its subfolders) with an exported version, offline: one line per image, file, best "
            "label and its score. " + where))
    cmd.add_argument("model_uri", metavar="MODEL_URI")
    cmd.add_argument("images", nargs="+", metavar="IMAGE", help="an image file, or a folder of them")
    cmd.add_argument("--top-k", type=int, default=1, help="labels per image, best first (default: 1)")
    cmd.add_argument("--json", action="store_true", help="one JSON object per line: file, labels, scores")
    cmd.add_argument("--workdir", default="", help="where a gs:// version is downloaded (default: a temporary folder)")
    cmd = commands.add_parser(
        "serve", help="serve an exported version with KServe's model server (V1 and V2 REST)", description=(
            "Serves an exported version with KServe's ModelServer: V1 (GET /v1/models, POST /v1/models/NAME:predict "
            '{"instances": [{"image_bytes": {"b64": ...}}]}) and the Open Inference Protocol V2 (/v2/health/ready, '
            f"/v2/models/NAME/infer), at most {serving.MAX_BATCH} images a request. The chosen candidate is served: "
            "the SavedModel, or the int8 TFLite file through LiteRT. This is also the command of kftune's KServe "
            "custom predictor. " + where))
    cmd.add_argument("model_uri", metavar="MODEL_URI")
    cmd.add_argument("--port", type=int, default=8080, help="HTTP port (default: 8080, KServe's)")
    cmd.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0; 127.0.0.1 for loopback only)")
    cmd.add_argument("--name", default="kftune", help="the model's name in the URLs (default: kftune; KServe passes "
                                                      "the InferenceService's name)")


def _predict(args) -> int:
    import tempfile

    import numpy as np

    from kftune import dataset, serving
    from kftune.errors import InputError

    if args.top_k < 1:
        raise InputError(f"--top-k must be a whole number >= 1. Received: {args.top_k}")
    missing = [f for f in args.images if not Path(f).exists()]
    if missing:
        raise InputError(f"{len(missing)} image file(s) do not exist: {', '.join(missing[:5])}: check the paths.")
    # A folder stands for the images in it, and in its subfolders (a test set kept in class folders).
    paths = []
    for name in args.images:
        if not Path(name).is_dir():
            paths.append(name)
        elif found := dataset.image_files(Path(name)):
            paths += [str(path) for path in found]
        else:
            raise InputError(f"folder `{name}` holds no image files ({', '.join(sorted(dataset.IMAGE_SUFFIXES))}): "
                             "give image files, or a folder of them.")
    with tempfile.TemporaryDirectory() as workdir:
        served = serving.open_version(args.model_uri, args.workdir or workdir)
        print(f"kftune: {serving.describe(served)}", file=sys.stderr)
        decoded: dict[str, object] = {}
        for path in paths:
            # A bad file is named on stderr, the others still answered, and the exit code says one failed.
            try:
                decoded[path] = serving.decode(Path(path).read_bytes(), served.spec, f"`{path}`")
            except InputError as e:
                print(f"kftune: error: {e}", file=sys.stderr)
        files = list(decoded)
        for start in range(0, len(files), serving.MAX_BATCH):
            chunk = files[start:start + serving.MAX_BATCH]
            images = np.stack([decoded[f] for f in chunk])
            for path, prediction in zip(chunk, served.classify(images, top_k=args.top_k), strict=True):
                if args.json:
                    print(json.dumps({"file": path, **prediction.to_json()}))
                else:
                    answers = ", ".join(f"{label} {score:.4f}" for label, score in
                                        zip(prediction.labels, prediction.scores, strict=True))
                    print(f"{path}\t{answers}")
        failed = len(paths) - len(files)
    return 1 if failed else 0


def _submit(args) -> int:
    from kftune.errors import InputError
    from pipelines import submit

    if args.pipeline_root and not args.pipeline_root.startswith(("gs://", "s3://", "minio://")):
        raise InputError(f"--pipeline-root must be a gs://, s3:// or minio:// URI. Received: {args.pipeline_root!r}")
    compiled = Path(args.compiled)
    arguments = parse_arguments(args.parameters, compiled)
    check_arguments(arguments, compiled, local=False)
    name = args.pipeline_name or next(yaml.safe_load_all(compiled.read_text()))["pipelineInfo"]["name"]
    submission = submit.Submission(
        compiled=compiled, arguments=arguments, host=args.host, experiment=args.experiment, pipeline_name=name,
        version=args.version, run_name=args.run_name, pipeline_root=args.pipeline_root,
        service_account=args.service_account, namespace=args.namespace,
    )
    return submit.submit(submission, wait_for=args.wait, timeout=args.timeout, poll=args.poll)


if __name__ == "__main__":
    sys.exit(main())
