import io

import boto3
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mnist_server.app import create_app
from PIL import Image

from mnist_pipeline import keys
from mnist_pipeline.settings import ServerSettings
from tests.conftest import BUCKET, REGION

VERSION = "20261204T150000Z-1a2b3c4d"


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def settings(max_upload_bytes=5_000_000):
    return ServerSettings(
        bucket=BUCKET,
        model_version=VERSION,
        instance_id="i-1",
        advertised_url="http://127.0.0.1:8000",
        host="127.0.0.1",
        port=8000,
        max_upload_bytes=max_upload_bytes,
    )


@pytest.fixture
def s3(aws, trained):
    client = boto3.client("s3", region_name=REGION)
    client.put_object(
        Bucket=BUCKET, Key=keys.tflite_model(VERSION), Body=trained["tflite"]
    )
    client.put_object(
        Bucket=BUCKET, Key=keys.smoke_digits(VERSION), Body=trained["smoke"]
    )
    return client


@pytest.fixture
def client(s3):
    with TestClient(create_app(settings(), s3=s3, announce=False)) as test_client:
        yield test_client


def test_health_names_model_version(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model_version": VERSION}


def test_predicts_real_test_digits(client, small_mnist):
    correct = 0
    for image, label in zip(
        small_mnist.x_test[:50], small_mnist.y_test[:50], strict=True
    ):
        response = client.post("/predict", files={"file": ("d.png", png(image))})
        assert response.status_code == 200
        body = response.json()
        assert len(body["probabilities"]) == 10
        assert abs(sum(body["probabilities"]) - 1) < 1e-3
        assert body["confidence"] == max(body["probabilities"])
        assert body["model_version"] == VERSION
        correct += body["digit"] == label

    assert correct >= 45


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "empty"),
        (b"this is not an image", "not an image format"),
        (png(np.zeros((28, 28), np.uint8)), "blank"),
    ],
)
def test_bad_images_get_400(client, data, detail):
    response = client.post("/predict", files={"file": ("x.png", data)})

    assert response.status_code == 400
    assert detail in response.json()["detail"]


def test_missing_file_field_gets_422(client):
    response = client.post("/predict", data={"other": "x"})

    assert response.status_code == 422


def test_oversized_upload_gets_413(s3, small_mnist):
    app = create_app(settings(max_upload_bytes=100), s3=s3, announce=False)
    with TestClient(app) as client:
        response = client.post(
            "/predict", files={"file": ("d.png", png(small_mnist.x_test[0]))}
        )

    assert response.status_code == 413
    assert "larger than 100 bytes" in response.json()["detail"]


def test_openapi_docs_served(client):
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_corrupt_model_never_becomes_healthy(s3):
    s3.put_object(Bucket=BUCKET, Key=keys.tflite_model(VERSION), Body=b"garbage")

    with (
        pytest.raises(ValueError),
        TestClient(create_app(settings(), s3=s3, announce=False)),
    ):
        pass


def test_wrong_model_fails_smoke_check(s3, trained):
    from mnist_server.classifier import SmokeCheckError

    with np.load(io.BytesIO(trained["smoke"])) as smoke:
        images, labels = smoke["images"], smoke["labels"]
    shifted = io.BytesIO()
    np.savez(shifted, images=images, labels=(labels + 1) % 10)
    s3.put_object(
        Bucket=BUCKET, Key=keys.smoke_digits(VERSION), Body=shifted.getvalue()
    )

    with (
        pytest.raises(SmokeCheckError, match="misclassified 20 of 20"),
        TestClient(create_app(settings(), s3=s3, announce=False)),
    ):
        pass
