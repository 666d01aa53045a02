import io
import json
from urllib.parse import quote_plus

import boto3
import pytest

from mnist_pipeline import instances, keys
from mnist_pipeline.records import RunRecord, RunStatus
from mnist_pipeline.store import PipelineStore, UploadInProgressError
from tests.conftest import BUCKET, REGION, s3_event
from tests.functions import load_function


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


def put(key: str, body: bytes) -> dict:
    """Upload an object and return its Lambda event, key URL-encoded as S3 does."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
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
    assert run.training_epochs == 2
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


def test_failed_launch_marks_run_failed_and_raises(
    launcher, lambda_context, small_mnist_npz, monkeypatch
):
    from botocore.exceptions import ClientError

    def no_capacity(**kwargs):
        raise ClientError(
            {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no g4dn"}},
            "RunInstances",
        )

    monkeypatch.setattr(launcher.ec2, "run_instances", no_capacity)

    with pytest.raises(ClientError):
        launcher.lambda_handler(put("data/mnist.npz", small_mnist_npz), lambda_context)

    [run] = runs()
    assert run.status == RunStatus.FAILED
    assert "InsufficientInstanceCapacity" in run.reason


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
