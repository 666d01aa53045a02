"""Shared fixtures: real MNIST data, AWS mocks, events and trained models.

Real MNIST is read from the directory in the ``MNIST_DIR`` environment
variable (the four IDX files, gzip or not). Tests that need it skip with a
message naming the variable when it is unset, except under CI (``CI`` set),
where a missing dataset is an error rather than a silent skip.
"""

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from mnist_pipeline import instances, keys
from mnist_pipeline.dataset import Dataset, save_dataset
from mnist_pipeline.settings import ServerSettings
from mnist_pipeline.sources import read_idx_directory

ROOT = Path(__file__).resolve().parent.parent
EVENTS_DIR = ROOT / "events"
BUCKET = "dev-mnist-123456789012-us-east-1"
REGION = "us-east-1"
MODEL_VERSION = "20261204T150000Z-1a2b3c4d"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    value = os.environ.get("MNIST_DIR")
    message = "Set MNIST_DIR to a directory holding the four MNIST IDX files."
    if not value and os.environ.get("CI"):
        pytest.fail(message)
    if not value:
        pytest.skip(message)

    return Path(value)


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> Dataset:
    """The full real MNIST dataset: 60,000 train and 10,000 test digits."""
    return read_idx_directory(mnist_dir)


@pytest.fixture(scope="session")
def small_mnist(mnist: Dataset) -> Dataset:
    """A real subset: the first 3,000 train and 500 test digits."""
    return Dataset(
        mnist.x_train[:3000],
        mnist.y_train[:3000],
        mnist.x_test[:500],
        mnist.y_test[:500],
    )


def png(image: np.ndarray) -> bytes:
    """Encode a uint8 image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")

    return buffer.getvalue()


def dataset_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    save_dataset(buffer, *dataset)

    return buffer.getvalue()


@pytest.fixture(scope="session")
def small_mnist_npz(small_mnist: Dataset) -> bytes:
    return dataset_bytes(small_mnist)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region, so nothing can reach real AWS."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "MnistPipelineTests",
        "POWERTOOLS_SERVICE_NAME": "mnist-pipeline",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def aws(aws_env: None):
    """moto's in-process AWS with the pipeline bucket created."""
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        yield


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def store(aws):
    from mnist_pipeline.store import PipelineStore

    return PipelineStore(boto3.client("s3", region_name=REGION), BUCKET)


_TEMPLATE_NUMBERS = itertools.count()


def launch_template(ec2, name: str | None = None) -> str:
    """Create a launch template in moto's EC2 and return its id."""
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return ec2.create_launch_template(
        LaunchTemplateName=name or f"template-{next(_TEMPLATE_NUMBERS)}",
        LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.small"},
    )["LaunchTemplate"]["LaunchTemplateId"]


def start_test_instance(ec2, role: str, run_id: str = "none") -> str:
    """Start an instance of the test stack with a role and run id tag."""
    return instances.start_instance(
        ec2,
        launch_template(ec2),
        role,
        "test-stack",
        {instances.RUN_ID_TAG: run_id},
        f"{role}-{run_id}-{next(_TEMPLATE_NUMBERS)}",
    )


def instance_state(ec2, instance_id: str) -> str:
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservation["Instances"][0]["State"]["Name"]


def s3_event(
    name: str,
    key: str | None = None,
    etag: str | None = None,
    size: int | None = None,
    bucket: str = BUCKET,
) -> dict:
    """Load a stored S3 event and set its object; ``key`` is given URL-encoded."""
    event = json.loads((EVENTS_DIR / name).read_text())
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["bucket"]["arn"] = f"arn:aws:s3:::{bucket}"
    if key is not None:
        record["s3"]["object"]["key"] = key
    if etag is not None:
        record["s3"]["object"]["eTag"] = etag
    if size is not None:
        record["s3"]["object"]["size"] = size

    return copy.deepcopy(event)


class FakeLambdaContext:
    function_name = "test-function"
    memory_limit_in_mb = 1024
    invoked_function_arn = (
        "arn:aws:lambda:us-east-1:123456789012:function:test-function"
    )
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    function_version = "$LATEST"

    def get_remaining_time_in_millis(self) -> int:
        return 120_000


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()


@pytest.fixture(scope="session")
def trained(small_mnist: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CNN trained for 2 epochs on real digits, exported like the trainer does."""
    from mnist_trainer.export import export_tflite, select_smoke_digits
    from mnist_trainer.model import train_and_evaluate

    from mnist_pipeline.hyperparameters import resolve

    # 2,700 training digits: small batches give the optimizer enough steps.
    chosen = dataclasses.replace(resolve("default", 2), batch_size=32)
    result = train_and_evaluate(small_mnist, chosen)
    tflite, _ = export_tflite(result.model, small_mnist.x_test)
    images, labels = select_smoke_digits(
        result.model, small_mnist.x_test, small_mnist.y_test
    )
    smoke = io.BytesIO()
    np.savez_compressed(smoke, images=images, labels=labels)

    return {"result": result, "tflite": tflite, "smoke": smoke.getvalue()}


@pytest.fixture
def s3(aws, trained):
    """moto's S3 with the ``trained`` model stored as version MODEL_VERSION."""
    client = boto3.client("s3", region_name=REGION)
    client.put_object(
        Bucket=BUCKET, Key=keys.tflite_model(MODEL_VERSION), Body=trained["tflite"]
    )
    client.put_object(
        Bucket=BUCKET, Key=keys.smoke_digits(MODEL_VERSION), Body=trained["smoke"]
    )
    return client


def server_settings(port: int = 8000, **changes) -> ServerSettings:
    """Server settings for MODEL_VERSION in the test bucket."""
    settings = ServerSettings(
        bucket=BUCKET,
        model_version=MODEL_VERSION,
        instance_id="i-1",
        advertised_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1",
        port=port,
        max_upload_bytes=5_000_000,
    )
    return dataclasses.replace(settings, **changes)


@contextlib.contextmanager
def serve(settings: ServerSettings, s3) -> Iterator[str]:
    """Run the server app with uvicorn in a thread and yield its URL."""
    import uvicorn
    from mnist_server.app import create_app

    app = create_app(settings, s3=s3, announce=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            if not thread.is_alive():
                raise RuntimeError("The server thread exited before it started.")
            time.sleep(0.05)
        if not server.started:
            raise TimeoutError(
                f"The server did not start on port {settings.port} within 30 s."
            )
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
