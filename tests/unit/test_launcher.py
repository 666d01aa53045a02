import dataclasses
import io
import json
from urllib.parse import quote_plus

import boto3
import botocore.endpoint
import pytest

from mnist_pipeline import instances, keys
from mnist_pipeline.hyperparameters import resolve
from mnist_pipeline.localcloud.faults import ON_DEMAND, SPOT
from mnist_pipeline.records import RunRecord, RunStatus
from mnist_pipeline.store import PipelineStore, UploadInProgressError
from tests.conftest import BUCKET, REGION, s3_event
from tests.functions import load_function
from tests.unit.test_instances import RunInstancesFaults


@pytest.fixture
def launcher(aws, monkeypatch):
    ec2 = boto3.client("ec2", region_name=REGION)
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    template = ec2.create_launch_template(
        LaunchTemplateName="trainer",
        LaunchTemplateData={"ImageId": image_id, "InstanceType": "g4dn.xlarge"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("TRAINER_LAUNCH_TEMPLATE_ID", template)
    monkeypatch.setenv("STACK_NAME", "test-stack")
    monkeypatch.setenv("TRAINING_EPOCHS", "2")

    return load_function("launcher")


def put(key: str, body: bytes, metadata: dict[str, str] | None = None) -> dict:
    """Upload an object and return its Lambda event, key URL-encoded as S3 does."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=BUCKET, Key=key, Body=body, Metadata=metadata or {})
    etag = s3.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')

    return s3_event(
        "launcher_dataset_uploaded.json", key=quote_plus(key), etag=etag, size=len(body)
    )


def trainer_instances() -> list[dict]:
    ec2 = boto3.client("ec2", region_name=REGION)
    reservations = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]
    return [instance for r in reservations for instance in r["Instances"]]


def runs() -> list[RunRecord]:
    return PipelineStore(boto3.client("s3", region_name=REGION), BUCKET).list_runs()


def test_valid_upload_starts_one_tagged_trainer(
    launcher, lambda_context, small_mnist_npz
):
    # GIVEN a real MNIST subset uploaded under data/
    event = put("data/mnist.npz", small_mnist_npz)

    # WHEN the launcher handles its event
    result = launcher.lambda_handler(event, lambda_context)

    # THEN one trainer runs, tagged with the run, and the run record shows it
    [run] = runs()
    [instance] = trainer_instances()
    tags = instances.tags_of(instance)
    assert result == {"runs": [{"run_id": run.run_id, "status": "training"}]}
    assert run.status == RunStatus.TRAINING
    assert run.data_key == "data/mnist.npz"
    assert run.train_size == 3000
    assert run.test_size == 500
    assert run.hyperparameters == resolve("default", 2).to_dict()
    assert run.warnings is None
    assert run.trainer_instance_id == instance["InstanceId"]
    assert tags[instances.ROLE_TAG] == instances.TRAINER_ROLE
    assert tags[instances.RUN_ID_TAG] == run.run_id
    assert tags[instances.STACK_TAG] == "test-stack"


def test_stored_event_key_is_url_decoded(launcher, lambda_context, small_mnist_npz):
    # GIVEN the stored event, whose key "data/mnist+2026-12-04.npz" encodes a space
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=BUCKET, Key="data/mnist 2026-12-04.npz", Body=small_mnist_npz)
    etag = s3.head_object(Bucket=BUCKET, Key="data/mnist 2026-12-04.npz")["ETag"]
    event = s3_event(
        "launcher_dataset_uploaded.json",
        etag=etag.strip('"'),
        size=len(small_mnist_npz),
    )

    launcher.lambda_handler(event, lambda_context)

    [run] = runs()
    assert run.data_key == "data/mnist 2026-12-04.npz"
    assert run.status == RunStatus.TRAINING


@pytest.mark.parametrize(
    "key",
    ["data/plus+sign.npz", "data/ünïcödé digits.npz", "data/sub folder/set (1).npz"],
)
def test_unusual_keys_start_runs(launcher, lambda_context, small_mnist_npz, key):
    launcher.lambda_handler(put(key, small_mnist_npz), lambda_context)

    [run] = runs()
    assert run.data_key == key
    assert len(trainer_instances()) == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not a readable .npz"),
        (b"definitely not numpy", "not a readable .npz"),
    ],
)
def test_bad_upload_is_rejected_without_instance(
    launcher, lambda_context, body, reason
):
    launcher.lambda_handler(put("data/bad.npz", body), lambda_context)

    [run] = runs()
    assert run.status == RunStatus.REJECTED
    assert reason in run.reason
    assert trainer_instances() == []


def test_wrong_arrays_are_rejected_with_reason(launcher, lambda_context):
    import numpy as np

    buffer = io.BytesIO()
    np.savez(
        buffer,
        x_train=np.zeros((2000, 28, 28), np.float64),
        y_train=np.zeros(2000, np.uint8),
        x_test=np.zeros((200, 28, 28), np.uint8),
        y_test=np.zeros(200, np.uint8),
    )

    launcher.lambda_handler(put("data/floats.npz", buffer.getvalue()), lambda_context)

    [run] = runs()
    assert run.status == RunStatus.REJECTED
    assert "x_train has dtype '<f8', expected uint8" in run.reason
    assert trainer_instances() == []


def test_non_dataset_key_is_ignored(launcher, lambda_context):
    result = launcher.lambda_handler(put("data/", b""), lambda_context)

    assert result == {"runs": []}
    assert runs() == []


def test_duplicate_events_start_one_trainer(launcher, lambda_context, small_mnist_npz):
    event = put("data/mnist.npz", small_mnist_npz)

    for _ in range(5):
        launcher.lambda_handler(event, lambda_context)

    assert len(runs()) == 1
    assert len(trainer_instances()) == 1


def test_event_during_unfinished_claim_raises(
    launcher, lambda_context, small_mnist_npz
):
    # GIVEN another invocation that claimed the upload moments ago
    event = put("data/mnist.npz", small_mnist_npz)
    etag = event["Records"][0]["s3"]["object"]["eTag"]
    store = PipelineStore(boto3.client("s3", region_name=REGION), BUCKET)
    version_id = event["Records"][0]["s3"]["object"]["versionId"]
    store.claim_upload(
        "data/mnist.npz", etag, "20261204T150000Z-aaaaaaaa", 150, version_id
    )

    # WHEN a second delivery arrives THEN it raises, so the event is retried
    with pytest.raises(UploadInProgressError):
        launcher.lambda_handler(event, lambda_context)
    assert trainer_instances() == []


def test_stale_claim_is_taken_over(launcher, lambda_context, small_mnist_npz):
    # GIVEN a lock left by an invocation that crashed long ago
    event = put("data/mnist.npz", small_mnist_npz)
    etag = event["Records"][0]["s3"]["object"]["eTag"]
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(
        Bucket=BUCKET,
        Key=keys.upload_lock(
            "data/mnist.npz", etag, event["Records"][0]["s3"]["object"]["versionId"]
        ),
        Body=json.dumps(
            {
                "run_id": "20261204T150000Z-aaaaaaaa",
                "created_at": "2026-12-04T15:00:00Z",
            }
        ).encode(),
    )

    launcher.lambda_handler(event, lambda_context)

    [run] = runs()
    assert run.run_id == "20261204T150000Z-aaaaaaaa"
    assert len(trainer_instances()) == 1


def test_overwritten_object_is_not_trained(launcher, lambda_context, small_mnist_npz):
    # GIVEN an event for a version that was replaced before the launcher ran
    event = put("data/mnist.npz", small_mnist_npz)
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=BUCKET, Key="data/mnist.npz", Body=small_mnist_npz + b"x"
    )

    launcher.lambda_handler(event, lambda_context)

    [run] = runs()
    assert run.status == RunStatus.REJECTED
    assert "changed or disappeared" in run.reason
    assert trainer_instances() == []


@pytest.fixture
def faults(launcher, monkeypatch) -> RunInstancesFaults:
    """Fault rules for the launcher's RunInstances requests; backoff not slept."""
    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)

    return RunInstancesFaults(launcher.ec2)


def test_failed_launch_marks_run_failed_and_raises(
    launcher, faults, lambda_context, small_mnist_npz
):
    faults.fail_run_instances("InsufficientInstanceCapacity")

    # WHEN no trainer starts THEN the handler raises, for Lambda's retries
    with pytest.raises(instances.InstanceStartError):
        launcher.lambda_handler(put("data/mnist.npz", small_mnist_npz), lambda_context)

    # AND the run records the problem and the fix
    [run] = runs()
    assert run.status == RunStatus.FAILED
    assert run.trainer_instance_id is None
    assert run.reason.startswith("The trainer did not start: ")
    assert "InsufficientInstanceCapacity" in run.reason
    assert "Add subnets in other Availability Zones to SubnetIds" in run.reason
    assert trainer_instances() == []


def test_retried_event_starts_trainer_of_failed_run(
    launcher, faults, lambda_context, small_mnist_npz
):
    # GIVEN a run that failed because no zone had capacity
    event = put("data/mnist.npz", small_mnist_npz)
    faults.fail_run_instances("InsufficientInstanceCapacity")
    with pytest.raises(instances.InstanceStartError):
        launcher.lambda_handler(event, lambda_context)
    [failed] = runs()

    # WHEN Lambda retries the event once capacity is back
    faults.clear()
    launcher.lambda_handler(event, lambda_context)

    # THEN the same run gets its trainer, and a further delivery starts nothing
    launcher.lambda_handler(event, lambda_context)
    [run] = runs()
    [instance] = trainer_instances()
    assert run.run_id == failed.run_id
    assert run.status == RunStatus.TRAINING
    assert run.reason is None
    assert run.trainer_instance_id == instance["InstanceId"]
    assert len(faults.requests) == 1


def test_redelivered_rejected_upload_stays_rejected(launcher, lambda_context):
    event = put("data/bad.npz", b"not an archive")

    for _ in range(2):
        launcher.lambda_handler(event, lambda_context)

    [run] = runs()
    assert run.status == RunStatus.REJECTED
    assert trainer_instances() == []


@pytest.fixture
def subnets(aws) -> list[str]:
    """moto's default subnets in the first two Availability Zones."""
    ec2 = boto3.client("ec2", region_name=REGION)
    found = ec2.describe_subnets(
        Filters=[{"Name": "default-for-az", "Values": ["true"]}]
    )["Subnets"]
    found.sort(key=lambda subnet: subnet["AvailabilityZone"])

    return [subnet["SubnetId"] for subnet in found[:2]]


def test_trainer_spot_then_on_demand_fallback(
    launcher, subnets, monkeypatch, lambda_context, small_mnist_npz
):
    # GIVEN two subnets, Spot wanted, and On-Demand capacity in the second only
    monkeypatch.setenv("SUBNET_IDS", ",".join(subnets))
    monkeypatch.setenv("USE_SPOT", "true")
    launcher = load_function("launcher")
    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)
    faults = RunInstancesFaults(launcher.ec2)
    faults.fail_run_instances("InsufficientInstanceCapacity", market=SPOT)
    faults.fail_run_instances("InsufficientInstanceCapacity", subnet_ids=subnets[:1])

    launcher.lambda_handler(put("data/mnist.npz", small_mnist_npz), lambda_context)

    # THEN the trainer runs On-Demand in the second subnet, tried last
    [run] = runs()
    [instance] = trainer_instances()
    tried = list(dict.fromkeys(faults.attempts()))
    assert tried == [
        (subnets[0], SPOT),
        (subnets[1], SPOT),
        (subnets[0], ON_DEMAND),
        (subnets[1], ON_DEMAND),
    ]
    assert instance["SubnetId"] == subnets[1]
    assert "InstanceLifecycle" not in instance
    assert run.trainer_instance_id == instance["InstanceId"]


def test_takeover_keeps_trainer_of_crashed_invocation(
    launcher, faults, lambda_context, small_mnist_npz
):
    # GIVEN an invocation that started a trainer, then crashed before
    # recording it, and whose lock is now stale
    event = put("data/mnist.npz", small_mnist_npz)
    s3_object = event["Records"][0]["s3"]["object"]
    run_id = "20261204T150000Z-aaaaaaaa"
    lock = keys.upload_lock("data/mnist.npz", s3_object["eTag"], s3_object["versionId"])
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=BUCKET,
        Key=lock,
        Body=json.dumps({"run_id": run_id, "created_at": "2026-12-04T15:00:00Z"}),
    )
    orphan = instances.start_instance(
        launcher.ec2,
        launcher.SETTINGS.trainer_launch_template_id,
        instances.TRAINER_ROLE,
        "test-stack",
        {instances.RUN_ID_TAG: run_id},
        f"train-{run_id}",
    )

    # WHEN a later delivery takes the run over
    launcher.lambda_handler(event, lambda_context)

    # THEN it records that trainer instead of starting a second one
    [run] = runs()
    assert run.trainer_instance_id == orphan
    assert [i["InstanceId"] for i in trainer_instances()] == [orphan]


def test_invalid_subnet_setting_fails_at_import(launcher, monkeypatch):
    monkeypatch.setenv("SUBNET_IDS", "subnet-0a1b2c3d,sg-0a1b2c3d")

    with pytest.raises(Exception, match="'sg-0a1b2c3d' is not a subnet id"):
        load_function("launcher")


def test_missing_setting_fails_at_import(aws, monkeypatch):
    monkeypatch.delenv("TRAINER_LAUNCH_TEMPLATE_ID", raising=False)
    monkeypatch.setenv("BUCKET_NAME", BUCKET)

    with pytest.raises(Exception, match="TRAINER_LAUNCH_TEMPLATE_ID is missing"):
        load_function("launcher")


def test_same_bytes_uploaded_again_start_new_run(
    launcher, lambda_context, small_mnist_npz
):
    # GIVEN an upload, then the same bytes uploaded again: a new S3 version
    first = put("data/mnist.npz", small_mnist_npz)
    second = put("data/mnist.npz", small_mnist_npz)
    second["Records"][0]["s3"]["object"]["versionId"] = "second-version"

    launcher.lambda_handler(first, lambda_context)
    launcher.lambda_handler(second, lambda_context)

    assert len(runs()) == 2
    assert len(trainer_instances()) == 2


def test_training_metadata_sets_the_runs_hyperparameters(
    launcher, lambda_context, small_mnist_npz
):
    metadata = {"train-recipe": "fast", "train-epochs": "3", "train-seed": "7"}
    launcher.lambda_handler(
        put("data/mnist.npz", small_mnist_npz, metadata), lambda_context
    )

    [run] = runs()
    assert run.status == RunStatus.TRAINING
    expected = dataclasses.replace(resolve("fast"), epochs=3, seed=7)
    assert run.hyperparameters == expected.to_dict()
    assert len(trainer_instances()) == 1


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"train-epochs": "many"}, "train-epochs='many'"),
        ({"train-recipe": "turbo"}, "Unknown recipe 'turbo'"),
        ({"train-epoch": "3"}, "Unknown training metadata train-epoch"),
    ],
)
def test_bad_training_metadata_is_rejected_before_any_instance(
    launcher, lambda_context, small_mnist_npz, metadata, named
):
    launcher.lambda_handler(
        put("data/mnist.npz", small_mnist_npz, metadata), lambda_context
    )

    [run] = runs()
    assert run.status == RunStatus.REJECTED
    assert named in run.reason
    assert trainer_instances() == []
