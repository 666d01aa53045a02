"""Reaper Lambda: end instances and runs that stopped making progress.

Runs on a schedule. A trainer or server that crashed, hung or never
reported leaves its run in ``training`` or ``promoting`` and may leave its
instance running. For each such run the reaper terminates the instance and
marks the run ``failed`` with the reason when:

* a trainer runs longer than ``MAX_TRAINING_MINUTES`` plus a grace period
  (the instance's own time limit should have stopped it);
* a running trainer wrote no heartbeat (``progress.json``) for
  ``HEARTBEAT_MINUTES``: it hangs;
* a trainer instance ended without writing ``train_meta.json`` or leaving
  a checkpoint to resume;
* a run got no trainer instance at all (its launcher invocation crashed);
* a new server ended, or did not report ready within
  ``SERVER_START_MINUTES``. The previous server keeps serving.

A trainer instance that ended (a spot interruption, a stop, the time
limit) after saving a checkpoint is not a failure: the reaper starts a new
instance for the run, which resumes from the checkpoint, up to
``MAX_TRAINER_ATTEMPTS`` instances per run (see `resume_trainer`).

It also terminates servers that a cutover replaced, once
``SERVER_GRACE_SECONDS`` have passed since the cutover (see
`retire_replaced_servers`).
"""

import datetime
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from mnist_pipeline import instances
from mnist_pipeline.exceptions import InvalidRecordError
from mnist_pipeline.records import RunRecord, RunStatus, rollback_failure, utc_now
from mnist_pipeline.settings import ReaperSettings
from mnist_pipeline.store import PipelineStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()

# Read at import so that a missing variable fails the first invocation.
SETTINGS = ReaperSettings.from_env()
s3 = boto3.client("s3")
# Retries throttled and failed EC2 requests in place; see `instances`.
ec2 = boto3.client("ec2", config=instances.EC2_CONFIG)

# Extra minutes beyond a limit before the reaper acts, so that it never
# races an instance that is finishing on time.
GRACE_MINUTES = 5
ENDED_STATES = ("shutting-down", "terminated", "stopping", "stopped")


def _parse_time(timestamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _minutes_since(timestamp: str, now: datetime.datetime) -> float:
    return (now - _parse_time(timestamp)).total_seconds() / 60


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


def trainer_state(record: RunRecord) -> str | None:
    """Return the state of a training run's trainer instance, if it has one."""
    if record.status != RunStatus.TRAINING or record.trainer_instance_id is None:
        return None

    return instance_state(record.trainer_instance_id)


def stalled_reason(
    store: PipelineStore,
    record: RunRecord,
    now: datetime.datetime,
    state: str | None,
) -> tuple[str | None, str | None]:
    """Return why a run stalled and which instance to end, or (None, None).

    ``state`` is the trainer's instance state from `trainer_state`.
    """
    if record.status == RunStatus.TRAINING:
        if record.trainer_instance_id is None:
            if _minutes_since(record.created_at, now) > GRACE_MINUTES:
                return "No trainer instance was started for this run.", None
            return None, None
        if state in ENDED_STATES:
            if store.get_train_meta(record.run_id) is None:
                return (
                    "The trainer instance ended without writing train_meta.json"
                    " and left no checkpoint to resume (or used up "
                    f"{SETTINGS.max_trainer_attempts} instances).",
                    None,
                )
            return None, None  # the gate will handle the meta
        started_at = record.trainer_started_at or record.created_at
        age = _minutes_since(started_at, now)
        limit = SETTINGS.max_training_minutes + GRACE_MINUTES
        if age > limit:
            return (
                f"Training ran {age:.0f} minutes, past the limit of {limit}.",
                record.trainer_instance_id,
            )
        progress = store.get_progress(record.run_id)
        if progress is not None and progress.instance_id == record.trainer_instance_id:
            started_at = progress.updated_at
        silent = _minutes_since(started_at, now)
        if silent > SETTINGS.heartbeat_minutes:
            return (
                f"The trainer sent no heartbeat for {silent:.0f} minutes (limit "
                f"{SETTINGS.heartbeat_minutes}); it is hung.",
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


def resume_trainer(store: PipelineStore, record: RunRecord, state: str | None) -> bool:
    """Start a new trainer for a run whose trainer ended after a checkpoint.

    Returns whether one started. The new instance finds the checkpoint and
    resumes (`mnist_trainer.job`). Nothing starts once the run has used
    ``MAX_TRAINER_ATTEMPTS`` instances, or when the launch template is not
    configured. ``state`` is the trainer's instance state from `trainer_state`.
    """
    if (
        record.status != RunStatus.TRAINING
        or record.trainer_instance_id is None
        or not SETTINGS.trainer_launch_template_id
        or record.trainer_attempts >= SETTINGS.max_trainer_attempts
    ):
        return False
    if state not in ENDED_STATES:
        return False
    if store.get_train_meta(record.run_id) is not None:
        return False
    checkpoint = store.get_checkpoint(record.run_id)
    if checkpoint is None:
        return False

    attempt = record.trainer_attempts + 1
    instance_id = instances.start_instance(
        ec2,
        launch_template_id=SETTINGS.trainer_launch_template_id,
        role=instances.TRAINER_ROLE,
        stack_name=SETTINGS.stack_name,
        tags={instances.RUN_ID_TAG: record.run_id},
        client_token=f"train-{record.run_id}-{attempt}",
        subnet_ids=SETTINGS.subnet_ids,
        spot=SETTINGS.use_spot,
    )
    # A stopped instance would keep its volume, and its cost, forever.
    previous = record.trainer_instance_id
    instances.terminate_instance(ec2, previous)
    record.update(
        trainer_instance_id=instance_id,
        trainer_attempts=attempt,
        trainer_started_at=utc_now(),
    )
    store.put_run(record)
    logger.info(
        "Trainer restarted from its checkpoint",
        extra={
            "run_id": record.run_id,
            "instance_id": instance_id,
            "previous_instance_id": previous,
            "epochs_done": checkpoint.epochs_done,
            "attempt": attempt,
        },
    )
    metrics.add_metric(name="TrainersResumed", unit=MetricUnit.Count, value=1)
    return True


@tracer.capture_method
def reap(store: PipelineStore, now: datetime.datetime) -> list[RunRecord]:
    """Fail every stalled run, ending its instance; return the runs failed.

    A run whose trainer ended after a checkpoint gets a new trainer instead.
    A stalled rollback leaves its run promoted, with the failure in its reason.
    """
    failed = []
    for record in store.list_runs():
        if record.status not in (RunStatus.TRAINING, RunStatus.PROMOTING):
            continue
        # One DescribeInstances per trainer serves both checks below.
        state = trainer_state(record)
        try:
            if resume_trainer(store, record, state):
                continue
        except (instances.InstanceStartError, ClientError) as exc:
            record.update(
                status=RunStatus.FAILED,
                reason=f"The trainer could not be restarted from its checkpoint: {exc}",
            )
            store.put_run(record)
            logger.error(
                "Trainer restart failed",
                extra={"run_id": record.run_id, "reason": record.reason},
            )
            failed.append(record)
            continue
        reason, instance_id = stalled_reason(store, record, now, state)
        if reason is None:
            continue

        if instance_id:
            instances.terminate_instance(ec2, instance_id)
        if record.rollback_requested_at:
            # The model served before and still may: the run stays promoted.
            record.update(
                status=RunStatus.PROMOTED,
                rollback_requested_at=None,
                reason=f"{record.reason or ''} "
                f"{rollback_failure(record.rollback_requested_at)}: {reason}".strip(),
            )
        else:
            record.update(status=RunStatus.FAILED, reason=reason)
        store.put_run(record)
        logger.warning(
            "Stalled run ended",
            extra={
                "run_id": record.run_id,
                "status": record.status,
                "reason": reason,
                "instance_id": instance_id,
            },
        )
        metrics.add_metric(name="RunsReaped", unit=MetricUnit.Count, value=1)
        failed.append(record)

    return failed


def running_servers() -> list[dict[str, Any]]:
    """Return the descriptions of this stack's pending and running servers."""
    paginator = ec2.get_paginator("describe_instances")
    pages = paginator.paginate(
        Filters=[
            {"Name": f"tag:{instances.STACK_TAG}", "Values": [SETTINGS.stack_name]},
            {"Name": f"tag:{instances.ROLE_TAG}", "Values": [instances.SERVER_ROLE]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )

    return [
        instance
        for page in pages
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]


@tracer.capture_method
def retire_replaced_servers(store: PipelineStore, now: datetime.datetime) -> list[str]:
    """Terminate servers replaced more than the grace period ago; return their ids.

    ``serving/current.json`` records when its server took over (``since``).
    A server of this stack that was launched before that moment and is not
    the current one was replaced then or earlier, so once the grace period
    has passed since ``since`` it is terminated. These are never terminated:

    * the current server;
    * the new server of a run in ``promoting`` (a promotion or rollback
      whose server has not reported ready yet);
    * a server launched after the current one took over, which may be a
      new server whose run record the gate has not written yet.

    Without a serving pointer nothing is terminated here. Calling this
    again terminates nothing more, so repeated schedules are safe.
    """
    try:
        current = store.get_serving()
    except InvalidRecordError as exc:
        logger.error(
            "Malformed serving pointer, retiring no server", extra={"error": str(exc)}
        )
        return []
    if current is None:
        return []
    took_over = _parse_time(current.since)
    if (now - took_over).total_seconds() < SETTINGS.server_grace_seconds:
        return []

    starting = {
        record.server_instance_id
        for record in store.list_runs()
        if record.status == RunStatus.PROMOTING and record.server_instance_id
    }
    retired = []
    for server in running_servers():
        instance_id = server["InstanceId"]
        if instance_id == current.instance_id or instance_id in starting:
            continue
        if server["LaunchTime"] >= took_over:
            continue

        instances.terminate_instance(ec2, instance_id)
        logger.info(
            "Replaced server terminated after the grace period",
            extra={
                "instance_id": instance_id,
                "serving_instance_id": current.instance_id,
                "serving_since": current.since,
            },
        )
        metrics.add_metric(name="ServersRetired", unit=MetricUnit.Count, value=1)
        retired.append(instance_id)

    return retired


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Fail stalled runs and retire replaced servers.

    The event is the schedule's and carries nothing.
    """
    store = PipelineStore(s3, SETTINGS.bucket)
    failed = reap(store, datetime.datetime.now(datetime.UTC))
    retired = retire_replaced_servers(store, datetime.datetime.now(datetime.UTC))

    return {
        "failed": [{"run_id": r.run_id, "reason": r.reason} for r in failed],
        "retired": retired,
    }
