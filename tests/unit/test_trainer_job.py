import dataclasses
import io

import boto3
import numpy as np
import pytest
from mnist_trainer.interruption import Interruption
from mnist_trainer.job import train_run

from mnist_pipeline import keys
from mnist_pipeline.hyperparameters import Hyperparameters, resolve
from mnist_pipeline.records import RunRecord, RunStatus, TrainingState, utc_now
from mnist_pipeline.settings import TrainerSettings
from mnist_pipeline.store import PipelineStore
from tests.conftest import BUCKET, REGION

RUN_ID = "20261204T150000Z-1a2b3c4d"


@pytest.fixture
def store(aws):
    return PipelineStore(boto3.client("s3", region_name=REGION), BUCKET)


def stored_run(store, body: bytes, epochs=1, recipe="default") -> Hyperparameters:
    """Store a dataset and its run record; return the run's hyperparameters.

    The subset has 2,700 training digits, so batches are smaller than the
    recipe's to give the optimizer enough steps.
    """
    chosen = dataclasses.replace(resolve(recipe, epochs), batch_size=32)
    store.s3.put_object(Bucket=BUCKET, Key="data/mnist.npz", Body=body)
    etag = store.s3.head_object(Bucket=BUCKET, Key="data/mnist.npz")["ETag"].strip('"')
    now = utc_now()
    store.put_run(
        RunRecord(
            run_id=RUN_ID,
            status=RunStatus.TRAINING,
            data_key="data/mnist.npz",
            data_etag=etag,
            created_at=now,
            updated_at=now,
            hyperparameters=chosen.to_dict(),
        )
    )

    return chosen


def settings():
    return TrainerSettings(bucket=BUCKET, run_id=RUN_ID, instance_id="i-0123")


def test_run_publishes_model_report_and_meta(store, small_mnist_npz):
    chosen = stored_run(store, small_mnist_npz, epochs=2)

    meta = train_run(settings(), store.s3)

    stored_meta = store.get_train_meta(RUN_ID)
    assert meta.succeeded, meta.error
    assert stored_meta == meta
    assert 0.8 < meta.test_accuracy <= 1.0
    # What makes the run reproducible: recipe, data version, code, libraries.
    assert meta.hyperparameters == chosen.to_dict()
    assert meta.data_key == "data/mnist.npz"
    assert meta.data_etag == store.get_run(RUN_ID).data_etag
    assert meta.code_version == TrainerSettings(BUCKET, RUN_ID, "i").code_version
    assert meta.versions["tensorflow"] and meta.versions["keras"]
    assert meta.epochs_run == 2
    assert len(meta.history["val_accuracy"]) == 2
    assert meta.instance_id == "i-0123"
    assert meta.resumed_from_epoch is None
    assert set(meta.timings) >= {
        "download_s",
        "fit_s",
        "evaluate_s",
        "report_s",
        "export_s",
    }
    # Per-digit accuracy matches the overall accuracy on the test split.
    assert len(meta.per_class_accuracy) == 10
    counts = np.bincount(np.load(io.BytesIO(small_mnist_npz))["y_test"], minlength=10)
    overall = np.dot(meta.per_class_accuracy, counts) / counts.sum()
    assert overall == pytest.approx(meta.test_accuracy, abs=1e-4)
    for name in ("keras", "tflite", "smoke_digits"):
        assert store.get_bytes(meta.artifacts[name]), name
    for name in ("learning_curves", "confusion_matrix", "worst_digits"):
        assert meta.artifacts[name] == keys.report(RUN_ID, f"{name}.png")
        assert store.get_bytes(meta.artifacts[name]).startswith(b"\x89PNG")
    smoke = np.load(io.BytesIO(store.get_bytes(keys.smoke_digits(RUN_ID))))
    assert sorted(set(smoke["labels"].tolist())) == list(range(10))
    progress = store.get_progress(RUN_ID)
    assert progress.state == TrainingState.FINISHED
    assert (progress.epoch, progress.epochs) == (2, 2)
    assert progress.batch == progress.batches


def test_unknown_run_writes_failed_meta(store):
    meta = train_run(settings(), store.s3)

    assert meta.status == "failed"
    assert "RunNotFoundError" in meta.error
    assert store.get_train_meta(RUN_ID).status == "failed"


def test_corrupt_dataset_writes_failed_meta(store):
    stored_run(store, b"PK\x03\x04 not really a zip")

    meta = train_run(settings(), store.s3)

    assert meta.status == "failed"
    assert meta.error
    assert store.get_bytes(keys.tflite_model(RUN_ID)) is None


class InterruptAfterFirstCheckpoint(Interruption):
    """Reports an interruption once the first epoch's checkpoint is stored."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def is_set(self):
        if not super().is_set() and self.store.get_checkpoint(RUN_ID) is not None:
            self.set("test stop")
        return super().is_set()


def test_interrupted_run_resumes_later(store, small_mnist_npz):
    stored_run(store, small_mnist_npz, epochs=3)

    first = train_run(settings(), store.s3, InterruptAfterFirstCheckpoint(store))

    assert first is None
    assert store.get_train_meta(RUN_ID) is None  # the gate is not triggered
    progress = store.get_progress(RUN_ID)
    assert progress.state == TrainingState.INTERRUPTED
    checkpoint = store.get_checkpoint(RUN_ID)
    # Stopped within epoch 2: only epoch 1 counts as done.
    assert checkpoint.epochs_done == 1
    assert len(checkpoint.history["loss"]) == 1
    assert store.get_bytes(keys.checkpoint_model(RUN_ID))

    resumed = train_run(
        TrainerSettings(bucket=BUCKET, run_id=RUN_ID, instance_id="i-0456"), store.s3
    )

    assert resumed.succeeded, resumed.error
    assert resumed.resumed_from_epoch == 1
    assert resumed.epochs_run == 3
    assert len(resumed.history["val_accuracy"]) == 3
    assert resumed.history["loss"][0] == checkpoint.history["loss"][0]
    final = store.get_progress(RUN_ID)
    assert final.state == TrainingState.FINISHED
    assert final.instance_id == "i-0456"
    assert final.resumed_from_epoch == 1
