"""The reaper restarts interrupted trainers and ends silent ones."""

import datetime
import json

import pytest

from mnist_pipeline import instances
from mnist_pipeline.records import (
    RunRecord,
    RunStatus,
    TrainingCheckpoint,
    TrainingProgress,
    TrainingState,
    TrainMeta,
    utc_now,
)
from tests.conftest import (
    BUCKET,
    EVENTS_DIR,
    instance_state,
    launch_template,
    start_test_instance,
)
from tests.functions import load_function

RUN_ID = "20261204T150000Z-1a2b3c4d"


def minutes_ago(minutes: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=minutes)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@pytest.fixture
def reaper(ec2, monkeypatch):
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("STACK_NAME", "test-stack")
    monkeypatch.setenv("MAX_TRAINING_MINUTES", "60")
    monkeypatch.setenv("HEARTBEAT_MINUTES", "10")
    monkeypatch.setenv("MAX_TRAINER_ATTEMPTS", "2")
    monkeypatch.setenv("TRAINER_LAUNCH_TEMPLATE_ID", launch_template(ec2, "trainer"))
    return load_function("reaper")


def reap(reaper, lambda_context):
    event = json.loads((EVENTS_DIR / "reaper_scheduled.json").read_text())
    return reaper.lambda_handler(event, lambda_context)


def training_run(store, trainer: str, started_minutes_ago: float = 1, **fields):
    started = minutes_ago(started_minutes_ago)
    record = RunRecord(
        run_id=RUN_ID,
        status=RunStatus.TRAINING,
        data_key="data/x.npz",
        data_etag="e",
        created_at=started,
        updated_at=started,
        trainer_instance_id=trainer,
        trainer_started_at=started,
        **fields,
    )
    store.put_run(record)
    return record


def checkpoint(store, instance_id: str, epochs_done: int = 2) -> None:
    store.put_checkpoint(
        TrainingCheckpoint(
            run_id=RUN_ID,
            epochs_done=epochs_done,
            history={"loss": [0.3] * epochs_done},
            saved_at=utc_now(),
            instance_id=instance_id,
        )
    )


def heartbeat(store, instance_id: str, updated_at: str) -> None:
    store.put_progress(
        TrainingProgress(
            run_id=RUN_ID,
            instance_id=instance_id,
            state=TrainingState.TRAINING,
            epoch=2,
            epochs=5,
            batch=100,
            batches=400,
            updated_at=updated_at,
        )
    )


def trainers(ec2, state: str) -> list[str]:
    reservations = ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{instances.RUN_ID_TAG}", "Values": [RUN_ID]},
            {"Name": "instance-state-name", "Values": [state]},
        ]
    )["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


def test_stopped_trainer_with_checkpoint_gets_a_new_instance(
    reaper, store, ec2, lambda_context
):
    old = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, old)
    checkpoint(store, old)
    ec2.stop_instances(InstanceIds=[old])

    result = reap(reaper, lambda_context)

    record = store.get_run(RUN_ID)
    [new] = trainers(ec2, "running")
    assert result["failed"] == []
    assert record.status == RunStatus.TRAINING
    assert record.trainer_instance_id == new != old
    assert record.trainer_attempts == 2
    # The stopped instance is terminated, so its volume stops costing.
    assert instance_state(ec2, old) == "terminated"
    tags = instances.tags_of(
        ec2.describe_instances(InstanceIds=[new])["Reservations"][0]["Instances"][0]
    )
    assert tags[instances.ROLE_TAG] == instances.TRAINER_ROLE

    # A second schedule while the new trainer runs changes nothing.
    reap(reaper, lambda_context)
    assert store.get_run(RUN_ID).trainer_instance_id == new
    assert trainers(ec2, "running") == [new]


def test_restarts_stop_after_the_attempt_limit(reaper, store, ec2, lambda_context):
    old = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, old, trainer_attempts=2)
    checkpoint(store, old)
    ec2.terminate_instances(InstanceIds=[old])

    reap(reaper, lambda_context)

    record = store.get_run(RUN_ID)
    assert record.status == RunStatus.FAILED
    assert "no checkpoint to resume (or used up 2 instances)" in record.reason
    assert trainers(ec2, "running") == []


def test_ended_trainer_without_checkpoint_fails_the_run(
    reaper, store, ec2, lambda_context
):
    old = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, old)
    ec2.terminate_instances(InstanceIds=[old])

    reap(reaper, lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.FAILED
    assert trainers(ec2, "running") == []


def test_finished_trainer_is_left_to_the_gate(reaper, store, ec2, lambda_context):
    old = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    record = training_run(store, old)
    checkpoint(store, old)
    store.put_train_meta(
        TrainMeta(
            run_id=RUN_ID,
            status="succeeded",
            data_key=record.data_key,
            data_etag=record.data_etag,
            started_at=record.created_at,
            finished_at=utc_now(),
        )
    )
    ec2.terminate_instances(InstanceIds=[old])

    reap(reaper, lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.TRAINING
    assert trainers(ec2, "running") == []


def test_silent_trainer_is_ended_and_its_run_failed(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, trainer, started_minutes_ago=30)
    heartbeat(store, trainer, minutes_ago(12))

    reap(reaper, lambda_context)

    record = store.get_run(RUN_ID)
    assert record.status == RunStatus.FAILED
    assert "no heartbeat for 12 minutes" in record.reason
    assert instance_state(ec2, trainer) == "terminated"


def test_trainer_with_a_recent_heartbeat_keeps_running(
    reaper, store, ec2, lambda_context
):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, trainer, started_minutes_ago=30)
    heartbeat(store, trainer, minutes_ago(1))

    reap(reaper, lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.TRAINING
    assert instance_state(ec2, trainer) == "running"


def test_trainer_that_never_reported_is_ended(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE, RUN_ID)
    training_run(store, trainer, started_minutes_ago=11)
    # A heartbeat from the run's previous instance does not count.
    heartbeat(store, "i-previous", minutes_ago(0))

    reap(reaper, lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.FAILED
    assert instance_state(ec2, trainer) == "terminated"
