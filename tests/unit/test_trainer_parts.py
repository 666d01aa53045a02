"""The trainer's report, interruption notice and device choice, on their own."""

import dataclasses
import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from mnist_trainer.interruption import Interruption, SpotNoticeWatcher
from mnist_trainer.model import plan_for
from mnist_trainer.report import confusion_matrix, per_class_accuracy, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


def test_confusion_matrix_and_per_digit_accuracy():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 2, 2])

    matrix = confusion_matrix(labels, predicted)

    assert matrix[0, 0] == 1
    assert matrix[0, 1] == 1
    assert matrix[1, 1] == 2
    assert matrix[1, 2] == 1
    assert matrix.sum() == len(labels)
    accuracy = per_class_accuracy(matrix)
    assert accuracy[:3] == [0.5, pytest.approx(2 / 3, abs=1e-6), 1.0]
    assert accuracy[3:] == [None] * 7  # digits absent from the test split


def test_report_pictures_are_pngs(small_mnist):
    rng = np.random.default_rng(0)
    count = len(small_mnist.y_test)
    probabilities = rng.dirichlet(np.ones(10), size=count)
    history = {
        "loss": [0.5, 0.2],
        "val_loss": [0.3, 0.2],
        "accuracy": [0.9, 0.95],
        "val_accuracy": [0.92, 0.96],
    }

    pictures, accuracy = write_report(
        history, small_mnist.x_test, small_mnist.y_test, probabilities
    )

    assert set(pictures) == {
        "learning_curves.png",
        "confusion_matrix.png",
        "worst_digits.png",
    }
    for body in pictures.values():
        assert body.startswith(PNG_SIGNATURE)
    assert len(accuracy) == 10


class _FakeMetadata(http.server.BaseHTTPRequestHandler):
    """Instance metadata with IMDSv2 tokens and an optional spot notice."""

    notice: bytes | None = None
    token_requests = 0

    def do_PUT(self):
        assert self.path == "/latest/api/token"
        assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        type(self).token_requests += 1
        self._reply(200, b"token-1")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
            self._reply(401, b"")
        elif self.path != NOTICE_PATH or self.notice is None:
            self._reply(404, b"")
        else:
            self._reply(200, self.notice)

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata_service():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeMetadata.notice = None
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeMetadata
    server.shutdown()


def test_spot_notice_sets_the_interruption(metadata_service):
    endpoint, service = metadata_service
    interruption = Interruption()
    watcher = SpotNoticeWatcher(interruption, endpoint=endpoint, poll_seconds=0.05)

    assert watcher.check() is False
    assert not interruption.is_set()

    service.notice = b'{"action": "terminate", "time": "2026-12-04T18:00:00Z"}'
    watcher.start()
    assert interruption.wait(timeout=5)
    watcher.join(timeout=5)
    assert "spot interruption notice" in interruption.reason
    assert "terminate" in interruption.reason
    assert service.token_requests >= 2


def test_unreachable_metadata_is_no_notice():
    interruption = Interruption()
    # Nothing listens on port 9 of the loopback address.
    watcher = SpotNoticeWatcher(interruption, endpoint="http://127.0.0.1:9")

    assert watcher.check() is False
    assert not interruption.is_set()


def test_metadata_endpoint_must_be_http():
    with pytest.raises(ValueError, match="AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        SpotNoticeWatcher(Interruption(), endpoint="file:///etc/passwd")


def test_device_plan_per_device():
    assert plan_for([]) == plan_for(())
    cpu = plan_for([])
    gpu = plan_for(["/physical_device:GPU:0"])

    assert (cpu.device, cpu.jit_compile, cpu.mixed_precision) == ("cpu", False, False)
    assert (gpu.device, gpu.jit_compile, gpu.mixed_precision) == ("gpu", True, True)


_TRAIN_TWICE = """
import dataclasses, json, sys
import tensorflow as tf
from mnist_trainer.model import train_and_evaluate
from mnist_pipeline.hyperparameters import resolve
from mnist_pipeline.sources import read_source
from mnist_pipeline.dataset import Dataset

# Deterministic ops fix the order of threaded float sums, the one source of
# variation that seeds cannot reach; the product leaves them off for speed.
tf.config.experimental.enable_op_determinism()
full = read_source(sys.argv[1])
small = Dataset(
    full.x_train[:3000], full.y_train[:3000], full.x_test[:500], full.y_test[:500]
)
# Small batches give the 2,700 training digits enough steps.
chosen = dataclasses.replace(resolve("default", 1), batch_size=32, seed=11)
runs = [train_and_evaluate(small, chosen) for _ in range(2)]
print(json.dumps([[r.evaluation.accuracy, r.history["loss"]] for r in runs]))
"""


def test_same_data_and_seed_give_the_same_accuracy(mnist_dir):
    # A child process, because deterministic ops cannot be turned off again.
    completed = subprocess.run(
        [sys.executable, "-c", _TRAIN_TWICE, str(mnist_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    first, second = json.loads(completed.stdout.strip().splitlines()[-1])

    assert first[0] > 0.8
    assert first[0] == second[0]
    assert first[1] == second[1]


def test_gpu_plan_runs_on_cpu(small_mnist):
    import keras
    from mnist_trainer.model import evaluate_model, fit_model

    from mnist_pipeline.dataset import Dataset
    from mnist_pipeline.hyperparameters import resolve

    tiny = Dataset(
        small_mnist.x_train[:512],
        small_mnist.y_train[:512],
        small_mnist.x_test[:100],
        small_mnist.y_test[:100],
    )
    chosen = dataclasses.replace(resolve("fast", 1), batch_size=128)
    gpu = plan_for(["/physical_device:GPU:0"])
    try:
        model, history, _ = fit_model(tiny, chosen, plan=gpu)
        evaluation = evaluate_model(model, tiny)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    convolution = next(layer for layer in model.layers if "conv" in layer.name)
    assert model.jit_compile
    assert convolution.dtype_policy.compute_dtype == "float16"
    # The softmax stays float32, so probabilities sum to 1 exactly enough.
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert np.allclose(evaluation.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert len(history["loss"]) == 1
