import io

import boto3
import numpy as np
import pytest
from mnist_trainer.job import train_run

from mnist_pipeline import keys
from mnist_pipeline.records import RunRecord, RunStatus, utc_now
from mnist_pipeline.settings import TrainerSettings
from mnist_pipeline.store import PipelineStore
from tests.conftest import BUCKET, REGION

RUN_ID = "20261204T150000Z-1a2b3c4d"


@pytest.fixture
def store(aws):
    return PipelineStore(boto3.client("s3", region_name=REGION), BUCKET)


def stored_run(store, body: bytes, epochs=1) -> None:
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
            training_epochs=epochs,
        )
    )


def settings():
    return TrainerSettings(bucket=BUCKET, run_id=RUN_ID, instance_id="i-0123")


def test_run_publishes_model_then_meta(store, small_mnist_npz):
    stored_run(store, small_mnist_npz, epochs=1)

    meta = train_run(settings(), store.s3)

    stored_meta = store.get_train_meta(RUN_ID)
    assert meta.succeeded, meta.error
    assert stored_meta == meta
    assert 0.8 < meta.test_accuracy <= 1.0
    assert meta.epochs == 1
    assert len(meta.history["val_accuracy"]) == 1
    assert meta.instance_id == "i-0123"
    assert meta.versions["tensorflow"]
    assert set(meta.timings) >= {"download_s", "fit_s", "evaluate_s", "export_s"}
    for key in (
        keys.keras_model(RUN_ID),
        keys.tflite_model(RUN_ID),
        keys.smoke_digits(RUN_ID),
    ):
        assert store.get_bytes(key), key
    smoke = np.load(io.BytesIO(store.get_bytes(keys.smoke_digits(RUN_ID))))
    assert sorted(set(smoke["labels"].tolist())) == list(range(10))


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
