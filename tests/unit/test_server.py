import http.client
import importlib
import io
import json
import socket
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from mnist_server.app import create_app
from PIL import Image

from mnist_pipeline import keys
from tests.conftest import BUCKET, MODEL_VERSION, png, serve, server_settings

VERSION = MODEL_VERSION
# A /predict request whose body stops after 3 of its announced 100,000 bytes.
PARTIAL_UPLOAD = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: multipart/form-data; boundary=BND\r\n"
    b"Content-Length: 100000\r\n\r\n"
    b'--BND\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'
)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_text(url: str, text: str, timeout: float = 10) -> str:
    """Poll ``url`` until its body contains ``text``; return the last body."""
    import requests

    deadline = time.monotonic() + timeout
    body = requests.get(url, timeout=10).text
    while text not in body and time.monotonic() < deadline:
        time.sleep(0.1)
        body = requests.get(url, timeout=10).text
    return body


@pytest.fixture
def client(s3):
    with TestClient(
        create_app(server_settings(), s3=s3, announce=False)
    ) as test_client:
        yield test_client


def test_health_names_model_version(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "model_version": VERSION,
        "run_id": VERSION,
    }


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
        assert body["run_id"] == VERSION
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
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert "application/x-www-form-urlencoded" in error["msg"]


def test_form_without_file_part_gets_422(client):
    response = client.post("/predict", files={"other": ("d.png", b"x")})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert "file field named `file`" in error["msg"]


def test_empty_multipart_body_gets_422(client):
    response = client.post(
        "/predict",
        content=b"",
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert "the request body is empty" in error["msg"]


@pytest.mark.parametrize(
    ("body", "content_type", "detail"),
    [
        (b"x", "multipart/form-data", "no boundary parameter"),
        (b"garbage", "multipart/form-data; boundary=abc", "malformed"),
        (
            b'--abc\r\nContent-Disposition: form-data; name="file"\r\n\r\nxyz',
            "multipart/form-data; boundary=abc",
            "ends before its closing boundary",
        ),
        (
            b"--abc\r\nContent-Type: image/png\r\n\r\nxyz\r\n--abc--\r\n",
            "multipart/form-data; boundary=abc",
            "no name in its Content-Disposition",
        ),
    ],
    ids=["no-boundary", "garbage", "cut-off", "unnamed-part"],
)
def test_bad_multipart_gets_400(client, body, content_type, detail):
    response = client.post(
        "/predict", content=body, headers={"content-type": content_type}
    )

    assert response.status_code == 400
    assert detail in response.json()["detail"]


def test_other_form_fields_are_ignored(client, small_mnist):
    image = png(small_mnist.x_test[0])
    expected = client.post("/predict", files={"file": ("d.png", image)}).json()

    response = client.post(
        "/predict", files={"note": (None, "hello"), "file": ("d.png", image)}
    )

    assert response.status_code == 200
    assert response.json() == expected


def test_file_part_without_filename_is_read(client, small_mnist):
    response = client.post(
        "/predict", files={"file": (None, png(small_mnist.x_test[0]))}
    )

    assert response.status_code == 200
    assert response.json()["digit"] == small_mnist.y_test[0]


def test_two_file_parts_get_413(client, small_mnist):
    image = png(small_mnist.x_test[0])
    files = [("file", ("a.png", image)), ("file", ("b.png", image))]

    response = client.post("/predict", files=files)

    assert response.status_code == 413
    assert "more than one `file` part" in response.json()["detail"]


def test_prediction_body_is_compact_json(client, small_mnist):
    response = client.post(
        "/predict", files={"file": ("d.png", png(small_mnist.x_test[0]))}
    )

    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == [
        "digit",
        "confidence",
        "probabilities",
        "model_version",
        "run_id",
    ]
    assert b" " not in response.content


def test_oversized_upload_gets_413(s3, small_mnist):
    app = create_app(server_settings(max_upload_bytes=100), s3=s3, announce=False)
    with TestClient(app) as client:
        response = client.post(
            "/predict", files={"file": ("d.png", png(small_mnist.x_test[0]))}
        )

    assert response.status_code == 413
    assert "larger than 100 bytes" in response.json()["detail"]


def test_oversized_body_rejected_before_reading(s3):
    from mnist_pipeline.localcloud.runner import free_port

    settings = server_settings(port=free_port(), max_upload_bytes=100)
    boundary = "limit"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        'filename="d.png"\r\n\r\n'
    ).encode()
    with (
        serve(settings, s3),
        socket.create_connection(("127.0.0.1", settings.port), timeout=10) as conn,
    ):
        # Content-Length announces 10 MB, and only the part header follows.
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + b"Content-Length: 10000000\r\n\r\n"
            + head
        )
        reply = http.client.HTTPResponse(conn)
        reply.begin()
        detail = json.loads(reply.read())["detail"]

    assert reply.status == 413
    assert "The request body is 10000000 bytes" in detail
    assert "for one file of at most 100 bytes" in detail


def test_oversized_chunked_body_gets_413(s3):
    from mnist_pipeline.localcloud.runner import free_port

    settings = server_settings(port=free_port(), max_upload_bytes=100)
    boundary = "limit"
    # Chunked, so the server learns the size only while reading: 70,000
    # bytes of one ignored field pass the 100 + 65,536-byte body limit.
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
    ).encode() + b"x" * 70_000
    with (
        serve(settings, s3),
        socket.create_connection(("127.0.0.1", settings.port), timeout=10) as conn,
    ):
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(part):x}\r\n".encode()
            + part
            + b"\r\n"
        )
        reply = http.client.HTTPResponse(conn)
        reply.begin()
        detail = json.loads(reply.read())["detail"]

    assert reply.status == 413
    assert "The request body is larger than the limit of 65636 bytes" in detail


def test_openapi_docs_served(client):
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("path", "field", "is_list"),
    [("/predict", "file", False), ("/predict/batch", "files", True)],
)
def test_openapi_describes_file_fields(client, path, field, is_list):
    operation = client.get("/openapi.json").json()["paths"][path]["post"]
    body = operation["requestBody"]

    assert body["required"] is True
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == [field]
    field_schema = schema["properties"][field]
    assert "PNG or JPEG" in field_schema["description"]
    file_schema = field_schema["items"] if is_list else field_schema
    assert file_schema["type"] == "string"
    assert file_schema["contentMediaType"] == "application/octet-stream"
    assert {"200", "400", "413", "422"} <= set(operation["responses"])


def test_corrupt_model_never_becomes_healthy(s3):
    s3.put_object(Bucket=BUCKET, Key=keys.tflite_model(VERSION), Body=b"garbage")

    with (
        pytest.raises(ValueError),
        TestClient(create_app(server_settings(), s3=s3, announce=False)),
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
        TestClient(create_app(server_settings(), s3=s3, announce=False)),
    ):
        pass


def test_batch_returns_results_in_order(client, small_mnist):
    images = small_mnist.x_test[:8]
    files = [("files", (f"{i}.png", png(image))) for i, image in enumerate(images)]

    response = client.post("/predict/batch", files=files)

    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert len(predictions) == 8
    for image, prediction in zip(images, predictions, strict=True):
        single = client.post("/predict", files={"file": ("d.png", png(image))}).json()
        assert prediction == single


def test_batch_over_limit_gets_413(s3, small_mnist):
    app = create_app(server_settings(max_batch_files=3), s3=s3, announce=False)
    files = [("files", (f"{i}.png", png(small_mnist.x_test[i]))) for i in range(4)]
    with TestClient(app) as client:
        response = client.post("/predict/batch", files=files)

    assert response.status_code == 413
    assert "4 files, more than the limit of 3" in response.json()["detail"]


def test_batch_file_over_limit_gets_413(s3, small_mnist):
    app = create_app(server_settings(max_upload_bytes=100), s3=s3, announce=False)
    files = [
        ("files", ("0.png", b"x" * 10)),
        ("files", ("1.png", png(small_mnist.x_test[1]))),
    ]
    with TestClient(app) as client:
        response = client.post("/predict/batch", files=files)

    assert response.status_code == 413
    assert response.json()["detail"].startswith("File 2 is larger than 100 bytes")


def test_batch_names_the_bad_file(client, small_mnist):
    files = [
        ("files", ("0.png", png(small_mnist.x_test[0]))),
        ("files", ("1.png", b"")),
    ]

    response = client.post("/predict/batch", files=files)

    assert response.status_code == 400
    assert response.json()["detail"].startswith("File 2: The uploaded file is empty")


def test_metrics_count_requests_and_digits(client, small_mnist):
    client.post("/predict", files={"file": ("d.png", png(small_mnist.x_test[0]))})
    client.post("/predict", files={"file": ("d.png", b"")})
    client.get("/no/such/path")

    text = client.get("/metrics").text

    assert (
        'http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    )
    assert (
        'http_requests_total{method="POST",route="/predict",status="400"} 1.0' in text
    )
    assert 'route="unmatched",status="404"' in text
    label = int(small_mnist.y_test[0])
    assert f'predictions_total{{digit="{label}",model_version="{VERSION}"}} 1.0' in text
    assert 'http_request_duration_seconds_bucket{le="0.01",route="/predict"}' in text


def test_concurrent_requests_get_identical_answers(s3, small_mnist):
    import concurrent.futures

    import requests

    from mnist_pipeline.localcloud.runner import free_port

    body = png(small_mnist.x_test[0])
    with serve(server_settings(port=free_port()), s3) as url:

        def predict(_):
            return requests.post(
                f"{url}/predict", files={"file": ("d.png", body)}, timeout=30
            )

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(predict, range(32)))

    assert [r.status_code for r in responses] == [200] * 32
    assert len({r.text for r in responses}) == 1


class HeldDecoding:
    """Replaces the app's read_digit with one that waits for `release`."""

    def __init__(self, read_digit) -> None:
        import threading

        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._read_digit = read_digit

    def __call__(self, image):
        self.calls += 1
        self.started.set()
        assert self.release.wait(30)
        return self._read_digit(image)


@pytest.fixture
def held_decoding(monkeypatch) -> HeldDecoding:
    from mnist_server import app as app_module

    held = HeldDecoding(app_module.read_digit)
    monkeypatch.setattr(app_module, "read_digit", held)
    return held


def large_photo(digit: np.ndarray) -> bytes:
    return encode_png(Image.fromarray(255 - digit).resize((600, 600)))


def small_image_in_large_file(digit: np.ndarray) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Comment", "x" * 20_000)
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG", pnginfo=text)
    return buffer.getvalue()


@pytest.mark.parametrize("encode", [large_photo, small_image_in_large_file])
def test_large_image_decodes_off_the_event_loop(s3, small_mnist, held_decoding, encode):
    import concurrent.futures

    import requests

    from mnist_pipeline.localcloud.runner import free_port

    with (
        serve(server_settings(port=free_port()), s3) as url,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        prediction = pool.submit(
            requests.post,
            f"{url}/predict",
            files={"file": ("digit.png", encode(small_mnist.x_test[0]))},
            timeout=60,
        )
        # /health responds while the decode is held on its worker thread.
        assert held_decoding.started.wait(30)
        health = requests.get(f"{url}/health", timeout=10)
        held_decoding.release.set()

        assert health.status_code == 200
        assert prediction.result().status_code == 200
        assert prediction.result().json()["digit"] == small_mnist.y_test[0]


def test_batch_stops_when_client_leaves(s3, small_mnist, held_decoding):
    import requests

    from mnist_pipeline.localcloud.runner import free_port

    photo = large_photo(small_mnist.x_test[0])
    body = b"".join(
        b'--BND\r\nContent-Disposition: form-data; name="files"; '
        b'filename="d.png"\r\n\r\n' + photo + b"\r\n"
        for _ in range(3)
    )
    body += b"--BND--\r\n"
    port = free_port()
    with serve(server_settings(port=port), s3) as url:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(
                b"POST /predict/batch HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=BND\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert held_decoding.started.wait(30)
        # The client has gone while its first file decodes.
        held_decoding.release.set()
        metrics = wait_for_text(f"{url}/metrics", 'route="/predict/batch"')
        health = requests.get(f"{url}/health", timeout=10)

    assert held_decoding.calls == 1
    assert 'route="/predict/batch",status="499"} 1.0' in metrics
    assert health.status_code == 200


def test_health_route_has_one_operation(client):
    paths = client.get("/openapi.json").json()["paths"]

    assert list(paths["/health"]) == ["get"]


def test_client_gone_mid_upload_counts_499(s3):
    from mnist_pipeline.localcloud.runner import free_port

    port = free_port()
    with serve(server_settings(port=port), s3) as url:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(PARTIAL_UPLOAD)
        metrics = wait_for_text(f"{url}/metrics", 'status="499"')

    assert 'route="/predict",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_stalled_upload_gets_408(s3, monkeypatch):
    from mnist_server import uploads

    from mnist_pipeline.localcloud.runner import free_port

    monkeypatch.setattr(uploads, "BODY_IDLE_TIMEOUT_SECONDS", 0.5)
    port = free_port()
    with (
        serve(server_settings(port=port), s3),
        socket.create_connection(("127.0.0.1", port), timeout=10) as connection,
    ):
        connection.sendall(PARTIAL_UPLOAD)
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = json.loads(response.read())
        closed = connection.recv(1) == b""

    assert response.status == 408
    assert "No part of the request body arrived for 0.5 s" in body["detail"]
    assert response.getheader("connection") == "close"
    assert closed


def test_health_accepts_head(client):
    response = client.head("/health")

    assert response.status_code == 200
    assert response.content == b""


def test_unexpected_error_gets_json_500(s3, small_mnist, monkeypatch):
    def broken_predict(digit):
        raise RuntimeError("interpreter failed")

    app = create_app(server_settings(), s3=s3, announce=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        # After start-up, whose smoke check classifies digits too.
        monkeypatch.setattr(app.state.classifier, "predict", broken_predict)
        response = client.post(
            "/predict", files={"file": ("d.png", png(small_mnist.x_test[0]))}
        )

    assert response.status_code == 500
    assert "logged the error" in response.json()["detail"]


def test_bare_benchmark_server_predicts_like_the_app(
    client, trained, small_mnist, tmp_path, monkeypatch
):
    # benchmarks/serving.py compares the app with this reference, so both
    # must do the same work and return the same probabilities.
    model_path = tmp_path / "model.tflite"
    model_path.write_bytes(trained["tflite"])
    monkeypatch.setenv("MODEL_PATH", str(model_path))
    bare_server = importlib.import_module("benchmarks.bare_server")

    # Without `with`, TestClient sends no lifespan events, which the bare
    # app does not handle.
    bare_client = TestClient(bare_server.app)

    for image in small_mnist.x_test[:20]:
        files = {"file": ("d.png", png(image))}
        expected = client.post("/predict", files=files).json()
        response = bare_client.post("/predict", files=files)

        assert response.status_code == 200
        assert response.json()["digit"] == expected["digit"]
        assert response.json()["probabilities"] == expected["probabilities"]
