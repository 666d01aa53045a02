import datetime
import json

import pytest

from mnist_pipeline import instances
from mnist_pipeline.records import (
    RunRecord,
    RunStatus,
    ServingPointer,
    TrainMeta,
    utc_now,
)
from tests.conftest import BUCKET, EVENTS_DIR, instance_state, start_test_instance
from tests.functions import load_function

RUN_ID = "20261204T150000Z-1a2b3c4d"
LONG_AGO = "2026-12-04T08:00:00Z"


@pytest.fixture
def reaper(ec2, monkeypatch):
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("MAX_TRAINING_MINUTES", "60")
    monkeypatch.setenv("SERVER_START_MINUTES", "15")
    return load_function("reaper")


def run(store, status, created_at, **fields):
    record = RunRecord(
        run_id=RUN_ID,
        status=status,
        data_key="data/x.npz",
        data_etag="e",
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )
    store.put_run(record)
    return record


def reap(reaper, lambda_context):
    event = json.loads((EVENTS_DIR / "reaper_scheduled.json").read_text())
    return reaper.lambda_handler(event, lambda_context)


def test_trainer_past_limit_is_ended(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    run(store, RunStatus.TRAINING, LONG_AGO, trainer_instance_id=trainer)

    result = reap(reaper, lambda_context)

    record = store.get_run(RUN_ID)
    assert instance_state(ec2, trainer) == "terminated"
    assert record.status == RunStatus.FAILED
    assert "past the limit of 65" in record.reason
    assert result["failed"][0]["run_id"] == RUN_ID


def test_trainer_that_died_silently_fails_run(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    ec2.terminate_instances(InstanceIds=[trainer])
    run(store, RunStatus.TRAINING, utc_now(), trainer_instance_id=trainer)

    reap(reaper, lambda_context)

    record = store.get_run(RUN_ID)
    assert record.status == RunStatus.FAILED
    assert "without writing train_meta.json" in record.reason


def test_finished_trainer_is_left_to_gate(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    ec2.terminate_instances(InstanceIds=[trainer])
    run(store, RunStatus.TRAINING, utc_now(), trainer_instance_id=trainer)
    store.put_train_meta(
        TrainMeta(
            run_id=RUN_ID,
            status="succeeded",
            data_key="data/x.npz",
            data_etag="e",
            started_at=utc_now(),
            finished_at=utc_now(),
        )
    )

    assert reap(reaper, lambda_context) == {"failed": []}
    assert store.get_run(RUN_ID).status == RunStatus.TRAINING


def test_healthy_runs_are_untouched(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    run(store, RunStatus.TRAINING, utc_now(), trainer_instance_id=trainer)

    assert reap(reaper, lambda_context) == {"failed": []}
    assert instance_state(ec2, trainer) == "running"


def test_server_that_never_got_ready_is_ended(reaper, store, ec2, lambda_context):
    # GIVEN an old model serving and a new server stuck starting for hours
    old_server = start_test_instance(ec2, instances.SERVER_ROLE)
    store.put_serving(
        ServingPointer(
            model_version="old",
            test_accuracy=0.99,
            instance_id=old_server,
            url="http://old:8000",
            since=LONG_AGO,
        )
    )
    new_server = start_test_instance(ec2, instances.SERVER_ROLE)
    run(store, RunStatus.PROMOTING, LONG_AGO, server_instance_id=new_server)

    reap(reaper, lambda_context)

    # THEN the new one is gone, the run failed and the old one still serves
    assert instance_state(ec2, new_server) == "terminated"
    assert store.get_run(RUN_ID).status == RunStatus.FAILED
    assert "did not report ready within 20 minutes" in store.get_run(RUN_ID).reason
    assert instance_state(ec2, old_server) == "running"
    assert store.get_serving().instance_id == old_server


def test_crashed_new_server_fails_run(reaper, store, ec2, lambda_context):
    new_server = start_test_instance(ec2, instances.SERVER_ROLE)
    ec2.terminate_instances(InstanceIds=[new_server])
    run(store, RunStatus.PROMOTING, utc_now(), server_instance_id=new_server)

    reap(reaper, lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.FAILED
    assert "ended before it reported ready" in store.get_run(RUN_ID).reason


def test_run_without_trainer_fails_after_grace(reaper, store, lambda_context):
    run(store, RunStatus.TRAINING, LONG_AGO)

    reap(reaper, lambda_context)

    assert "No trainer instance was started" in store.get_run(RUN_ID).reason


def test_minutes_since_parses_utc(reaper):
    now = datetime.datetime(2026, 12, 4, 9, 0, tzinfo=datetime.UTC)

    assert reaper._minutes_since(LONG_AGO, now) == 60
