"""Launcher Lambda: check an uploaded dataset and start its trainer.

Invoked by ``s3:ObjectCreated:*`` on ``data/*.npz``. For each new object it
takes the upload lock (so a redelivered event starts nothing), validates the
dataset, writes the run record and starts one trainer instance. A dataset
that fails its check gets a ``rejected`` run record with the reason, and no
instance starts.

A trainer that cannot start (no capacity in any subnet, a quota, throttling)
leaves its run ``failed`` with the reason and the fix, and the handler
raises. Lambda then retries the event, and each retry tries to start the
same run's trainer again. After the last retry the event goes to the
dead-letter queue, and replaying it from there tries once more.
"""

import datetime
import tempfile
from typing import Any
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from mnist_pipeline import hyperparameters, instances, keys
from mnist_pipeline.dataset import MAX_OBJECT_BYTES, check_dataset
from mnist_pipeline.exceptions import InvalidDatasetError
from mnist_pipeline.records import RunRecord, RunStatus, utc_now
from mnist_pipeline.settings import LauncherSettings
from mnist_pipeline.store import PipelineStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()

# Read at import so that a missing variable fails the first invocation.
SETTINGS = LauncherSettings.from_env()
s3 = boto3.client("s3")
# Retries throttled and failed EC2 requests in place; see `instances`.
ec2 = boto3.client("ec2", config=instances.EC2_CONFIG)


# A lock older than this, whose run has no trainer, belonged to an invocation
# that crashed. Longer than the function's 120 s timeout in template.yaml.
LOCK_STALE_SECONDS = 150


def new_run_id(data_key: str, etag: str, version_id: str | None) -> str:
    """Return a run id: the UTC time, then 8 hex digits of the upload's lock."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    digest = keys.upload_lock(data_key, etag, version_id).rsplit("/", 1)[1][:8]

    return f"{now}-{digest}"


def _reject(record: RunRecord, reason: str) -> RunRecord:
    record.update(status=RunStatus.REJECTED, reason=reason)
    logger.warning("Dataset rejected", extra={"reason": reason})
    metrics.add_metric(name="UploadsRejected", unit=MetricUnit.Count, value=1)

    return record


@tracer.capture_method
def start_run(
    store: PipelineStore,
    data_key: str,
    etag: str,
    size: int,
    version_id: str | None = None,
) -> RunRecord | None:
    """Validate one uploaded dataset and start its trainer.

    Returns the run record, or None when another delivery of the same event
    already handled this upload.

    Raises
    ------
    UploadInProgressError
        When another delivery of the event is still handling the upload;
        the retry finds it done or takes it over.
    InstanceStartError
        When no trainer started; the run is marked failed first.
    """
    claim = store.claim_upload(
        data_key,
        etag,
        new_run_id(data_key, etag, version_id),
        stale_after=LOCK_STALE_SECONDS,
        version_id=version_id,
    )
    if not claim.owned:
        logger.info(
            "Upload already handled, skipping duplicate event",
            extra={"run_id": claim.run_id},
        )
        return None
    run_id = claim.run_id

    logger.append_keys(run_id=run_id)
    now = utc_now()
    record = RunRecord(
        run_id=run_id,
        status=RunStatus.TRAINING,
        data_key=data_key,
        data_etag=etag,
        data_size=size,
        created_at=now,
        updated_at=now,
    )

    # Check the object before any instance costs money.
    if size > MAX_OBJECT_BYTES:
        store.put_run(
            _reject(
                record,
                f"The object has {size} bytes, more than "
                f"the limit of {MAX_OBJECT_BYTES}.",
            )
        )
        return record
    try:
        with tempfile.TemporaryFile() as local_copy:
            # IfMatch pins the version this event is about: if the key was
            # overwritten since, the newer object has an event of its own.
            metadata = store.download(data_key, etag, local_copy)
            summary = check_dataset(local_copy)
        chosen = hyperparameters.from_metadata(metadata, SETTINGS.hyperparameters)
    except (InvalidDatasetError, hyperparameters.InvalidRunRequestError) as exc:
        store.put_run(_reject(record, str(exc)))
        return record
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
            raise
        store.put_run(
            _reject(
                record,
                "The object changed or disappeared before it "
                "could be checked; its newer version starts its own run.",
            )
        )
        return record

    record.update(
        train_size=summary.train_size,
        test_size=summary.test_size,
        warnings=summary.warnings or None,
        hyperparameters=chosen.to_dict(),
    )
    for warning in summary.warnings:
        logger.warning("Dataset warning", extra={"warning": warning})
    store.put_run(record)

    # The trainer reads the run record for its data key, so the record
    # exists before the instance starts.
    try:
        instance_id = instances.start_instance(
            ec2,
            launch_template_id=SETTINGS.trainer_launch_template_id,
            role=instances.TRAINER_ROLE,
            stack_name=SETTINGS.stack_name,
            tags={instances.RUN_ID_TAG: run_id},
            client_token=f"train-{run_id}",
            subnet_ids=SETTINGS.subnet_ids,
            spot=SETTINGS.use_spot,
        )
    except (instances.InstanceStartError, ClientError, BotoCoreError) as exc:
        # Raised on after recording, so that Lambda retries the event and
        # finally sends it to the dead-letter queue.
        record.update(
            status=RunStatus.FAILED, reason=f"The trainer did not start: {exc}"
        )
        store.put_run(record)
        logger.error("Trainer did not start", extra={"reason": record.reason})
        metrics.add_metric(name="TrainerStartsFailed", unit=MetricUnit.Count, value=1)
        raise

    record.update(trainer_instance_id=instance_id, trainer_started_at=utc_now())
    store.put_run(record)
    logger.info(
        "Trainer started",
        extra={"instance_id": instance_id, "train_size": summary.train_size},
    )
    metrics.add_metric(name="RunsStarted", unit=MetricUnit.Count, value=1)

    return record


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=S3Event)
def lambda_handler(event: S3Event, context: LambdaContext) -> dict[str, Any]:
    """Start a run for every dataset object in the event."""
    store = PipelineStore(s3, SETTINGS.bucket)
    runs = []
    for record in event.records:
        bucket = record.s3.bucket.name
        data_key = unquote_plus(record.s3.get_object.key)
        logger.append_keys(bucket=bucket, key=data_key)

        if bucket != SETTINGS.bucket or not keys.is_dataset(data_key):
            logger.warning("Object is not a dataset of this pipeline, skipping")
            continue

        s3_object = record.s3.get_object
        run = start_run(
            store, data_key, s3_object.etag, s3_object.size, s3_object.version_id
        )
        if run is not None:
            runs.append({"run_id": run.run_id, "status": run.status})
        logger.remove_keys(["run_id"])

    return {"runs": runs}
