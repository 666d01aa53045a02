import dataclasses
import datetime
import json
import time

import pytest

from mnist_pipeline import instances
from mnist_pipeline.records import (
    RunRecord,
    RunStatus,
    ServingPointer,
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
LONG_AGO = "2026-12-04T08:00:00Z"
GRACE_SECONDS = 300


@pytest.fixture
def reaper(ec2, monkeypatch):
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("STACK_NAME", "test-stack")
    monkeypatch.setenv("MAX_TRAINING_MINUTES", "60")
    monkeypatch.setenv("SERVER_START_MINUTES", "15")
    monkeypatch.setenv("SERVER_GRACE_SECONDS", str(GRACE_SECONDS))
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

    assert reap(reaper, lambda_context)["failed"] == []
    assert store.get_run(RUN_ID).status == RunStatus.TRAINING


def test_healthy_runs_are_untouched(reaper, store, ec2, lambda_context):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    run(store, RunStatus.TRAINING, utc_now(), trainer_instance_id=trainer)

    assert reap(reaper, lambda_context)["failed"] == []
    assert instance_state(ec2, trainer) == "running"


def test_server_that_never_got_ready_is_ended(reaper, store, ec2, lambda_context):
    # GIVEN an old model serving at the address and a new server stuck
    # starting for hours
    old_server = start_test_instance(ec2, instances.SERVER_ROLE)
    allocation_id = ec2.allocate_address(Domain="vpc")["AllocationId"]
    ec2.associate_address(AllocationId=allocation_id, InstanceId=old_server)
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
    [address] = ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"]
    assert address["InstanceId"] == old_server


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


def start_server(ec2, run_id, stack="test-stack"):
    return instances.start_instance(
        ec2,
        launch_template(ec2),
        instances.SERVER_ROLE,
        stack,
        {instances.RUN_ID_TAG: run_id, instances.MODEL_VERSION_TAG: run_id},
        f"server-{run_id}",
    )


def launch_time(ec2, instance_id) -> datetime.datetime:
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservation["Instances"][0]["LaunchTime"]


def iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def cutover(store, current, since: datetime.datetime, previous=None):
    """Store a pointer at ``current`` that took over at ``since``."""
    store.put_serving(
        ServingPointer(
            model_version="new",
            test_accuracy=0.99,
            instance_id=current,
            url="http://203.0.113.10:8000",
            since=iso(since),
            previous_version="old" if previous else None,
            previous_instance_id=previous,
        )
    )


def replaced_servers(ec2):
    """Start an old and a new server; return them and a cutover time after both."""
    old = start_server(ec2, "old")
    new = start_server(ec2, "new")
    took_over = max(launch_time(ec2, old), launch_time(ec2, new))

    return old, new, took_over + datetime.timedelta(seconds=1)


def test_replaced_server_ends_after_grace(reaper, store, ec2):
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    retired = reaper.retire_replaced_servers(store, after_grace)

    assert retired == [old]
    assert instance_state(ec2, old) == "terminated"
    assert instance_state(ec2, new) == "running"


def test_replaced_server_runs_during_grace(reaper, store, ec2):
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    within_grace = since + datetime.timedelta(seconds=GRACE_SECONDS - 1)

    assert reaper.retire_replaced_servers(store, within_grace) == []
    assert instance_state(ec2, old) == "running"


def test_retiring_twice_ends_nothing_more(reaper, store, ec2):
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    first = reaper.retire_replaced_servers(store, after_grace)
    second = reaper.retire_replaced_servers(store, after_grace)

    assert first == [old]
    assert second == []
    assert instance_state(ec2, new) == "running"


def test_server_of_pending_promotion_is_kept(reaper, store, ec2):
    # GIVEN a promotion or rollback whose server started before the last
    # cutover and has not reported ready yet
    starting = start_server(ec2, RUN_ID)
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    run(store, RunStatus.PROMOTING, utc_now(), server_instance_id=starting)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    retired = reaper.retire_replaced_servers(store, after_grace)

    assert retired == [old]
    assert instance_state(ec2, starting) == "running"


def test_server_started_after_cutover_is_kept(reaper, store, ec2):
    # GIVEN a server the gate has just started, before it wrote the run record
    current = start_server(ec2, "new")
    just_started = start_server(ec2, RUN_ID)
    since = launch_time(ec2, current) - datetime.timedelta(seconds=1)
    cutover(store, current, since)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    assert reaper.retire_replaced_servers(store, after_grace) == []
    assert instance_state(ec2, just_started) == "running"


def test_no_pointer_retires_nothing(reaper, store, ec2):
    server = start_server(ec2, RUN_ID)
    much_later = launch_time(ec2, server) + datetime.timedelta(days=1)

    assert reaper.retire_replaced_servers(store, much_later) == []
    assert instance_state(ec2, server) == "running"


def test_other_stacks_servers_are_kept(reaper, store, ec2):
    foreign = start_server(ec2, "foreign", stack="other-stack")
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    assert reaper.retire_replaced_servers(store, after_grace) == [old]
    assert instance_state(ec2, foreign) == "running"


def test_trainers_are_not_retired(reaper, store, ec2):
    trainer = start_test_instance(ec2, instances.TRAINER_ROLE)
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    reaper.retire_replaced_servers(store, after_grace)

    assert instance_state(ec2, trainer) == "running"


def test_scheduled_run_reports_retired_servers(
    reaper, store, ec2, lambda_context, monkeypatch
):
    old, new, since = replaced_servers(ec2)
    cutover(store, new, since, previous=old)
    monkeypatch.setattr(
        reaper, "SETTINGS", dataclasses.replace(reaper.SETTINGS, server_grace_seconds=0)
    )
    # EC2 launch times have whole seconds, so the cutover is up to a second
    # ahead of the clock.
    while datetime.datetime.now(datetime.UTC) <= since:
        time.sleep(0.05)

    result = reap(reaper, lambda_context)

    assert result == {"failed": [], "retired": [old]}
    assert instance_state(ec2, old) == "terminated"


def test_malformed_pointer_retires_nothing(reaper, store, ec2):
    old, _, since = replaced_servers(ec2)
    store.s3.put_object(Bucket=BUCKET, Key="serving/current.json", Body=b"{oops")
    after_grace = since + datetime.timedelta(seconds=GRACE_SECONDS + 1)

    assert reaper.retire_replaced_servers(store, after_grace) == []
    assert instance_state(ec2, old) == "running"


def test_stalled_rollback_keeps_run_promoted(reaper, store, ec2, lambda_context):
    from mnist_pipeline.records import rollback_failure

    # GIVEN a rollback to a promoted run whose new server crashed
    new_server = start_test_instance(ec2, instances.SERVER_ROLE)
    ec2.terminate_instances(InstanceIds=[new_server])
    requested_at = utc_now()
    run(
        store,
        RunStatus.PROMOTING,
        utc_now(),
        server_instance_id=new_server,
        rollback_requested_at=requested_at,
        reason="Test accuracy 0.9900 meets the threshold 0.9500.",
    )

    reap(reaper, lambda_context)

    # THEN the run stays promoted, its reason kept and the failure added
    record = store.get_run(RUN_ID)
    assert record.status == RunStatus.PROMOTED
    assert record.rollback_requested_at is None
    assert record.reason.startswith("Test accuracy 0.9900 meets the threshold")
    assert f"{rollback_failure(requested_at)}: The new server ended" in record.reason
