"""Gate Lambda: stop the trainer, decide on promotion and finish cutovers.

Invoked by two kinds of S3 objects:

* ``models/<run_id>/train_meta.json``, written last by a trainer. The gate
  terminates that run's trainer, compares the model's test accuracy with the
  threshold and with the serving model, records the decision in the run
  record and, on promotion, starts a server instance for the new model.
* ``serving/ready/<instance_id>.json``, written by a new server once it
  serves HTTP with its model loaded and has classified the run's smoke
  digits correctly. The gate then moves the serving Elastic IP to the new
  server and points ``serving/current.json`` at it. The previous server
  keeps running for ``SERVER_GRACE_SECONDS``; the scheduled reaper then
  terminates it.

A rejected model leaves the current server untouched. The template runs
one invocation at a time (reserved concurrency 1), so each decision sees
the writes of the one before it, and a redelivered event finds its work
done.
"""

from typing import Any
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext

from mnist_pipeline import instances, keys
from mnist_pipeline.exceptions import InvalidRecordError
from mnist_pipeline.records import (
    Decision,
    RunRecord,
    RunStatus,
    ServingPointer,
    utc_now,
)
from mnist_pipeline.settings import GateSettings
from mnist_pipeline.store import PipelineStore


class CutoverPendingError(RuntimeError):
    """A ready report arrived before its run's promotion was recorded."""


logger = Logger()
tracer = Tracer()
metrics = Metrics()

# Read at import so that a missing variable fails the first invocation.
SETTINGS = GateSettings.from_env()
s3 = boto3.client("s3")
ec2 = boto3.client("ec2", config=instances.EC2_CONFIG)


def decide(
    test_accuracy: float,
    serving_accuracy: float | None,
    threshold: float,
    tolerance: float,
) -> tuple[Decision, str]:
    """Decide whether a model replaces the serving one, and return the reason."""
    if test_accuracy < threshold:
        return Decision.REJECT, (
            f"Test accuracy {test_accuracy:.4f} is below the threshold {threshold:.4f}."
        )
    if serving_accuracy is not None and test_accuracy < serving_accuracy - tolerance:
        return Decision.REJECT, (
            f"Test accuracy {test_accuracy:.4f} is worse than the serving model's "
            f"{serving_accuracy:.4f} by more than the tolerance {tolerance:.4f}."
        )
    if serving_accuracy is None:
        return Decision.PROMOTE, (
            f"Test accuracy {test_accuracy:.4f} meets the threshold {threshold:.4f} "
            "and no model is serving yet."
        )

    return Decision.PROMOTE, (
        f"Test accuracy {test_accuracy:.4f} meets the threshold {threshold:.4f} and "
        f"is within {tolerance:.4f} of the serving model's {serving_accuracy:.4f}."
    )


def start_server(model_version: str, client_token: str) -> str:
    """Start a server instance for a model version and return its id."""
    return instances.start_instance(
        ec2,
        launch_template_id=SETTINGS.server_launch_template_id,
        role=instances.SERVER_ROLE,
        stack_name=SETTINGS.stack_name,
        tags={
            instances.MODEL_VERSION_TAG: model_version,
            instances.RUN_ID_TAG: model_version,
        },
        client_token=client_token,
        subnet_ids=SETTINGS.subnet_ids,
    )


def move_serving_address(instance_id: str) -> None:
    """Associate the serving Elastic IP with an instance, taking it from another.

    Checks the current association first: a retried cutover finds the
    address already moved and leaves it, since EC2 may charge each remap.
    """
    allocation_id = SETTINGS.serving_allocation_id
    [address] = ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"]
    holder = address.get("InstanceId")
    if holder == instance_id:
        logger.info("Serving address already on the new server")
        return

    ec2.associate_address(
        AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
    )
    logger.info(
        "Serving address moved to the new server",
        extra={"public_ip": address.get("PublicIp"), "previous_holder": holder},
    )


@tracer.capture_method
def review_training(store: PipelineStore, run_id: str) -> RunRecord | None:
    """Terminate a run's trainer and promote or reject its model.

    Returns the updated run record, or None when the event is ignored: an
    unknown run, a malformed meta, or a run the gate already reviewed.
    """
    try:
        record = store.get_run(run_id)
    except InvalidRecordError as exc:
        logger.error(
            "Malformed run record, ignoring its train_meta.json",
            extra={"error": str(exc)},
        )
        return None
    if record is None:
        logger.warning("No run record for this train_meta.json, ignoring it")
        return None
    try:
        meta = store.get_train_meta(run_id)
    except InvalidRecordError as exc:
        logger.warning(
            "Malformed train_meta.json, ignoring it", extra={"error": str(exc)}
        )
        return None
    if meta is None or meta.run_id != run_id:
        logger.warning("train_meta.json is missing or names another run, ignoring it")
        return None
    if record.status != RunStatus.TRAINING:
        logger.info(
            "Run already reviewed, skipping duplicate event",
            extra={"status": record.status},
        )
        return None

    # The trainer shuts itself down; terminating here also covers a trainer
    # whose shutdown failed, and is harmless when it already ended.
    if record.trainer_instance_id:
        instances.terminate_instance(ec2, record.trainer_instance_id)
        logger.info(
            "Trainer terminated", extra={"instance_id": record.trainer_instance_id}
        )

    if not meta.succeeded or meta.test_accuracy is None:
        record.update(status=RunStatus.FAILED, reason=f"Training failed: {meta.error}")
        store.put_run(record)
        metrics.add_metric(name="TrainingFailed", unit=MetricUnit.Count, value=1)
        return record

    serving = store.get_serving()
    serving_accuracy = serving.test_accuracy if serving else None
    decision, reason = decide(
        meta.test_accuracy,
        serving_accuracy,
        SETTINGS.accuracy_threshold,
        SETTINGS.accuracy_tolerance,
    )
    record.update(
        test_accuracy=meta.test_accuracy,
        serving_version=serving.model_version if serving else None,
        serving_test_accuracy=serving_accuracy,
        decision=decision,
        reason=reason,
    )
    logger.info("Gate decision", extra={"decision": decision, "reason": reason})
    metric = "ModelsPromoted" if decision == Decision.PROMOTE else "ModelsRejected"
    metrics.add_metric(name=metric, unit=MetricUnit.Count, value=1)

    if decision == Decision.REJECT:
        record.update(status=RunStatus.NOT_PROMOTED)
        store.put_run(record)
        return record

    server_id = start_server(run_id, client_token=f"serve-{run_id}")
    record.update(status=RunStatus.PROMOTING, server_instance_id=server_id)
    store.put_run(record)
    logger.info("Server started for the new model", extra={"instance_id": server_id})

    return record


@tracer.capture_method
def complete_cutover(store: PipelineStore, ready_key: str) -> RunRecord | None:
    """Move the serving address and pointer to a new healthy server.

    The previous server keeps running; the reaper terminates it once the
    grace period has passed.
    """
    try:
        ready = store.get_server_ready(ready_key)
    except InvalidRecordError as exc:
        logger.warning("Malformed ready report, ignoring it", extra={"error": str(exc)})
        return None
    if ready is None:
        logger.warning("Ready report disappeared, ignoring it")
        return None

    logger.append_keys(run_id=ready.model_version, instance_id=ready.instance_id)
    try:
        record = store.get_run(ready.model_version)
    except InvalidRecordError as exc:
        logger.error(
            "Malformed run record, ignoring the ready report", extra={"error": str(exc)}
        )
        return None
    if record is not None and record.status == RunStatus.TRAINING:
        # S3 events arrive in no fixed order: this report overtook the
        # review that started the server. Raising makes the event retry.
        raise CutoverPendingError(
            f"Run {record.run_id} is still under review; retry the ready report."
        )
    if (
        record is None
        or record.status != RunStatus.PROMOTING
        or record.server_instance_id != ready.instance_id
    ):
        logger.warning("Ready report matches no pending promotion, ignoring it")
        return None

    # Another run may have been promoted while this server started. Apply the
    # gate's rule again against what serves now, so that of two parallel
    # promotions the better model stays, whichever server is ready last.
    current = store.get_serving()
    rollback = record.rollback_requested_at is not None
    if current and current.instance_id != ready.instance_id and not rollback:
        decision, reason = decide(
            record.test_accuracy or 0.0,
            current.test_accuracy,
            SETTINGS.accuracy_threshold,
            SETTINGS.accuracy_tolerance,
        )
        if decision == Decision.REJECT:
            instances.terminate_instance(ec2, ready.instance_id)
            record.update(
                status=RunStatus.NOT_PROMOTED,
                decision=decision,
                serving_version=current.model_version,
                serving_test_accuracy=current.test_accuracy,
                reason=f"Model {current.model_version} was promoted while this "
                f"server started. {reason}",
            )
            store.put_run(record)
            logger.info(
                "Cutover abandoned for a better serving model", extra={"reason": reason}
            )
            return record

    # Users reach the new server once the address moves; the pointer follows,
    # so it never names a server that users cannot reach at its URL.
    # NOTE: if the writes below fail on every retry, the address stays here
    # while the run stays promoting. Replay the event from the dead-letter
    # queue within ServerStartMinutes, or the reaper terminates this server.
    if SETTINGS.serving_allocation_id:
        move_serving_address(ready.instance_id)

    # On a retry after a partial failure the pointer already names this
    # server, and the server it replaced is recorded as the previous one.
    if current and current.instance_id == ready.instance_id:
        previous_version = current.previous_version
        previous_instance_id = current.previous_instance_id
    else:
        previous_version = current.model_version if current else None
        previous_instance_id = current.instance_id if current else None

    pointer = ServingPointer(
        model_version=ready.model_version,
        test_accuracy=record.test_accuracy or 0.0,
        instance_id=ready.instance_id,
        url=SETTINGS.serving_url or ready.url,
        since=utc_now(),
        previous_version=previous_version,
        previous_instance_id=previous_instance_id,
    )
    store.put_serving(pointer)
    store.put_serving_history(pointer)
    record.update(
        status=RunStatus.PROMOTED, server_url=ready.url, rollback_requested_at=None
    )
    store.put_run(record)
    logger.info(
        "New model serving",
        extra={"url": pointer.url, "previous_instance_id": previous_instance_id},
    )
    metrics.add_metric(name="CutoversCompleted", unit=MetricUnit.Count, value=1)

    return record


@tracer.capture_method
def start_rollback(store: PipelineStore, request_key: str) -> RunRecord | None:
    """Start a server for an earlier model version that a user asked for.

    The cutover then takes the same path as a promotion (smoke digits,
    ready report, address and pointer moved, old server retired after the
    grace period) but skips the accuracy rule.
    """
    try:
        request = store.get_rollback_request(request_key)
    except InvalidRecordError as exc:
        logger.warning(
            "Malformed rollback request, ignoring it", extra={"error": str(exc)}
        )
        return None
    if request is None:
        logger.warning("Rollback request disappeared, ignoring it")
        return None

    logger.append_keys(run_id=request.model_version)
    try:
        record = store.get_run(request.model_version)
    except InvalidRecordError as exc:
        logger.error(
            "Malformed run record, ignoring the rollback request",
            extra={"error": str(exc)},
        )
        return None
    current = store.get_serving()
    if record is None or record.status != RunStatus.PROMOTED:
        logger.warning(
            "Rollback target never served, ignoring the request",
            extra={"status": record.status if record else None},
        )
        return None
    if current is not None and current.model_version == request.model_version:
        logger.info("Rollback target is already serving, nothing to do")
        return None

    server_id = start_server(
        record.run_id, client_token=f"rollback-{record.run_id}-{request.requested_at}"
    )
    record.update(
        status=RunStatus.PROMOTING,
        server_instance_id=server_id,
        rollback_requested_at=request.requested_at,
    )
    store.put_run(record)
    logger.info("Server started for the rollback", extra={"instance_id": server_id})

    return record


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=S3Event)
def lambda_handler(event: S3Event, context: LambdaContext) -> dict[str, Any]:
    """Handle every train_meta.json and ready report in the event."""
    store = PipelineStore(s3, SETTINGS.bucket)
    results = []
    for record in event.records:
        key = unquote_plus(record.s3.get_object.key)
        logger.append_keys(bucket=record.s3.bucket.name, key=key)

        run_id = keys.run_id_from_train_meta(key)
        if record.s3.bucket.name != SETTINGS.bucket:
            logger.warning("Object is in another bucket, ignoring it")
            run = None
        elif run_id is not None:
            logger.append_keys(run_id=run_id)
            run = review_training(store, run_id)
        elif keys.is_server_ready(key):
            run = complete_cutover(store, key)
        elif keys.is_serving_request(key):
            run = start_rollback(store, key)
        else:
            logger.warning(
                "Object is not a train_meta.json, ready report or rollback request"
            )
            run = None

        if run is not None:
            results.append({"run_id": run.run_id, "status": run.status})
        logger.remove_keys(["run_id", "instance_id"])

    return {"runs": results}
