"""Reaper Lambda: end instances and runs that stopped making progress.

Runs on a schedule. A trainer or server that crashed, hung or never
reported leaves its run in ``training`` or ``promoting`` and may leave its
instance running. For each such run the reaper terminates the instance and
marks the run ``failed`` with the reason when:

* a trainer runs longer than ``MAX_TRAINING_MINUTES`` plus a grace period
  (the instance's own time limit should have stopped it);
* a trainer instance ended without writing ``train_meta.json``;
* a run got no trainer instance at all (its launcher invocation crashed);
* a new server ended, or did not report ready within
  ``SERVER_START_MINUTES``. The previous server keeps serving.
"""

import datetime
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from mnist_pipeline import instances
from mnist_pipeline.records import RunRecord, RunStatus
from mnist_pipeline.settings import ReaperSettings
from mnist_pipeline.store import PipelineStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()

# Read at import so that a missing variable fails the first invocation.
SETTINGS = ReaperSettings.from_env()
s3 = boto3.client("s3")
ec2 = boto3.client("ec2")

# Extra minutes beyond a limit before the reaper acts, so that it never
# races an instance that is finishing on time.
GRACE_MINUTES = 5
ENDED_STATES = ("shutting-down", "terminated", "stopping", "stopped")


def _minutes_since(timestamp: str, now: datetime.datetime) -> float:
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))

    return (now - then).total_seconds() / 60


def instance_state(instance_id: str) -> str:
    """Return an instance's state name, or ``terminated`` if EC2 forgot it."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return "terminated"
        raise
    if not reservations:
        return "terminated"

    return reservations[0]["Instances"][0]["State"]["Name"]


def stalled_reason(
    store: PipelineStore, record: RunRecord, now: datetime.datetime
) -> tuple[str | None, str | None]:
    """Return why a run stalled and which instance to end, or (None, None)."""
    if record.status == RunStatus.TRAINING:
        age = _minutes_since(record.created_at, now)
        if record.trainer_instance_id is None:
            if age > GRACE_MINUTES:
                return "No trainer instance was started for this run.", None
            return None, None
        state = instance_state(record.trainer_instance_id)
        if state in ENDED_STATES:
            if store.get_train_meta(record.run_id) is None:
                return (
                    "The trainer instance ended without writing train_meta.json.",
                    None,
                )
            return None, None  # the gate will handle the meta
        limit = SETTINGS.max_training_minutes + GRACE_MINUTES
        if age > limit:
            return (
                f"Training ran {age:.0f} minutes, past the limit of {limit}.",
                record.trainer_instance_id,
            )

    if record.status == RunStatus.PROMOTING and record.server_instance_id:
        state = instance_state(record.server_instance_id)
        if state in ENDED_STATES:
            return "The new server ended before it reported ready.", None
        waited = _minutes_since(record.updated_at, now)
        limit = SETTINGS.server_start_minutes + GRACE_MINUTES
        if waited > limit:
            return (
                f"The new server did not report ready within {limit} minutes.",
                record.server_instance_id,
            )

    return None, None


@tracer.capture_method
def reap(store: PipelineStore, now: datetime.datetime) -> list[RunRecord]:
    """Fail every stalled run, ending its instance; return the runs failed."""
    failed = []
    for record in store.list_runs():
        if record.status not in (RunStatus.TRAINING, RunStatus.PROMOTING):
            continue
        reason, instance_id = stalled_reason(store, record, now)
        if reason is None:
            continue

        if instance_id:
            instances.terminate_instance(ec2, instance_id)
        record.update(status=RunStatus.FAILED, reason=reason)
        store.put_run(record)
        logger.warning(
            "Stalled run failed",
            extra={
                "run_id": record.run_id,
                "reason": reason,
                "instance_id": instance_id,
            },
        )
        metrics.add_metric(name="RunsReaped", unit=MetricUnit.Count, value=1)
        failed.append(record)

    return failed


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Fail stalled runs; the event is the schedule's and carries nothing."""
    store = PipelineStore(s3, SETTINGS.bucket)
    failed = reap(store, datetime.datetime.now(datetime.UTC))

    return {"failed": [{"run_id": r.run_id, "reason": r.reason} for r in failed]}
