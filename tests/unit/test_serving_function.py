"""The serving Lambda: the same app through Mangum, fed function URL events."""

import base64
import io
import json

import boto3
import pytest
from PIL import Image

from mnist_pipeline import keys
from mnist_pipeline.records import ServingPointer, utc_now
from tests.conftest import BUCKET, EVENTS_DIR, REGION, FakeLambdaContext
from tests.functions import load_function

VERSION = "20261204T150000Z-1a2b3c4d"


@pytest.fixture
def serving(aws, trained, monkeypatch):
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=BUCKET, Key=keys.tflite_model(VERSION), Body=trained["tflite"])
    s3.put_object(Bucket=BUCKET, Key=keys.smoke_digits(VERSION), Body=trained["smoke"])
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.delenv("MODEL_VERSION", raising=False)
    store_pointer = ServingPointer(
        model_version=VERSION,
        test_accuracy=0.99,
        instance_id="i-1",
        url="http://x:8000",
        since=utc_now(),
    )
    s3.put_object(Bucket=BUCKET, Key=keys.SERVING_CURRENT, Body=store_pointer.to_json())

    return load_function("serving")


def url_event(
    method: str, path: str, body: bytes = b"", content_type: str = ""
) -> dict:
    event = json.loads((EVENTS_DIR / "serving_health.json").read_text())
    event["rawPath"] = path
    event["requestContext"]["http"].update(method=method, path=path)
    if body:
        event["headers"]["content-type"] = content_type
        event["body"] = base64.b64encode(body).decode()
        event["isBase64Encoded"] = True
    return event


def test_health_follows_serving_pointer(serving):
    response = serving.lambda_handler(url_event("GET", "/health"), FakeLambdaContext())

    assert response["statusCode"] == 200
    assert json.loads(response["body"])["model_version"] == VERSION


def test_predict_through_function_url(serving, small_mnist):
    png = io.BytesIO()
    Image.fromarray(small_mnist.x_test[0]).save(png, format="PNG")
    boundary = "testboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="d.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    event = url_event(
        "POST", "/predict", body, f"multipart/form-data; boundary={boundary}"
    )

    response = serving.lambda_handler(event, FakeLambdaContext())

    assert response["statusCode"] == 200
    result = json.loads(response["body"])
    assert result["digit"] == int(small_mnist.y_test[0])
    assert result["run_id"] == VERSION


def test_no_serving_model_fails_at_cold_start(aws, monkeypatch):
    from mnist_pipeline.exceptions import SettingsError

    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.delenv("MODEL_VERSION", raising=False)

    with pytest.raises(SettingsError, match="No model is serving yet"):
        load_function("serving")
