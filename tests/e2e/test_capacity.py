"""Trainer starts against EC2 capacity errors, on the local cloud.

The local cloud's fault proxy fails the functions' RunInstances requests
with EC2's own errors for chosen subnets, and moto plays the rest of AWS. The
stack gets moto's default subnets in two Availability Zones. No test here
trains: a run without capacity never starts a trainer, and the one that
starts is terminated once its subnet is checked.
"""

import json
import time
from urllib.parse import unquote_plus

import pytest

from mnist_pipeline import instances
from mnist_pipeline.cli import find_run, upload_dataset
from mnist_pipeline.localcloud import LocalCloud, dispatcher
from mnist_pipeline.localcloud.runner import free_port
from mnist_pipeline.records import RunStatus
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# The dispatcher retries a failed event after 5 s, and SQS moves it to the
# dead-letter queue once the last attempt's visibility timeout (the
# function's 120 s timeout) has passed.
DEAD_LETTER_TIMEOUT_SECONDS = 400


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    local = LocalCloud(
        ROOT,
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("localcloud"),
        parameter_overrides={"TrainingEpochs": "1"},
        schedule_seconds=2,
        inject_faults=True,
    )
    with local:
        yield local


@pytest.fixture
def faults(cloud):
    cloud.faults.rules.clear()
    yield cloud.faults.rules
    cloud.faults.rules.clear()


def wait_until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(1)
    return None


def trainers(cloud) -> list[dict]:
    reservations = cloud.client("ec2").describe_instances(
        Filters=[
            {"Name": f"tag:{instances.ROLE_TAG}", "Values": [instances.TRAINER_ROLE]}
        ]
    )["Reservations"]
    return [instance for r in reservations for instance in r["Instances"]]


def dead_letters(cloud) -> list[dict]:
    sqs = cloud.client("sqs")
    url = sqs.get_queue_url(QueueName=f"{cloud.stack_name}-LauncherFunction-dlq")
    messages = sqs.receive_message(
        QueueUrl=url["QueueUrl"], MaxNumberOfMessages=10, WaitTimeSeconds=1
    )
    return [json.loads(message["Body"]) for message in messages.get("Messages", [])]


def test_no_capacity_fails_run_and_dead_letters_event(cloud, faults, small_mnist):
    store = cloud.store
    assert len(cloud.subnet_ids) == 2

    # GIVEN no subnet of the stack has capacity for the trainer
    faults.fail_run_instances("InsufficientInstanceCapacity")

    # WHEN a dataset is uploaded
    key, etag = upload_dataset(store, small_mnist, "no-capacity", progress=False)

    # THEN the launcher fails every delivery and the event is dead-lettered
    letters = wait_until(lambda: dead_letters(cloud), DEAD_LETTER_TIMEOUT_SECONDS)
    assert letters, "the launcher's event never reached its dead-letter queue"
    [event] = letters
    assert unquote_plus(event["Records"][0]["s3"]["object"]["key"]) == key
    run = find_run(store, key, etag)
    assert run.status == RunStatus.FAILED
    assert run.trainer_instance_id is None
    assert "InsufficientInstanceCapacity" in run.reason
    assert "Add subnets in other Availability Zones to SubnetIds" in run.reason
    # AND each delivery tried both subnets, with botocore's retries in each
    tried = [request.subnet_id for request in faults.requests]
    per_delivery = instances.MAX_ATTEMPTS * len(cloud.subnet_ids)
    assert len(tried) == dispatcher.MAX_ATTEMPTS * per_delivery
    assert set(tried) == set(cloud.subnet_ids)
    assert all(request.error_code for request in faults.requests)
    # AND no instance was ever started
    assert trainers(cloud) == []


def test_trainer_starts_in_second_subnet(cloud, faults, small_mnist):
    store = cloud.store
    first, second = cloud.subnet_ids

    # GIVEN the first subnet's zone has no capacity for the trainer
    faults.fail_run_instances("InsufficientInstanceCapacity", subnet_ids=[first])

    key, etag = upload_dataset(store, small_mnist, "second-subnet", progress=False)

    # THEN the trainer starts in the second subnet and the run records it
    def started():
        run = find_run(store, key, etag)
        return run if run and run.trainer_instance_id else None

    run = wait_until(started, 120)
    assert run is not None, "no trainer started"
    assert run.status == RunStatus.TRAINING
    [trainer] = [t for t in trainers(cloud) if t["State"]["Name"] != "terminated"]
    assert trainer["InstanceId"] == run.trainer_instance_id
    assert trainer["SubnetId"] == second
    assert [r.subnet_id for r in faults.requests][-1] == second

    # The subnet is what this test checks; training would only cost time.
    cloud.client("ec2").terminate_instances(InstanceIds=[run.trainer_instance_id])
