"""One training run, from the run record to ``train_meta.json``.

Stages: read the run record, download the dataset, train and evaluate,
export, upload the artifacts, then write ``train_meta.json`` last, because
its arrival triggers the gate. When any stage fails the trainer still
writes a ``failed`` meta with the error, so the gate terminates the
instance and records the failure.
"""

import io
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import mnist_pipeline
from mnist_pipeline import keys
from mnist_pipeline.dataset import load_dataset
from mnist_pipeline.records import TrainMeta, utc_now
from mnist_pipeline.settings import TrainerSettings
from mnist_pipeline.store import PipelineStore
from mnist_trainer.export import export_tflite, select_smoke_digits
from mnist_trainer.model import (
    BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    train_and_evaluate,
)

logger = logging.getLogger(__name__)


class RunNotFoundError(RuntimeError):
    """The run record the instance was started for does not exist."""


def library_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "mnist_pipeline": mnist_pipeline.__version__,
    }


def _upload(store: PipelineStore, key: str, body: bytes, content_type: str) -> None:
    store.s3.put_object(
        Bucket=store.bucket, Key=key, Body=body, ContentType=content_type
    )


def train_run(settings: TrainerSettings, s3: Any) -> TrainMeta:
    """Train the run named by ``settings`` and publish its artifacts.

    Returns the meta it wrote. Every exception is turned into a ``failed``
    meta, because a trainer that dies silently would leave its GPU instance
    running until the reaper finds it.
    """
    store = PipelineStore(s3, settings.bucket)
    started_at = utc_now()
    meta = TrainMeta(
        run_id=settings.run_id,
        status="failed",
        data_key="",
        data_etag="",
        started_at=started_at,
        finished_at=started_at,
        instance_id=settings.instance_id,
        batch_size=BATCH_SIZE,
        seed=DEFAULT_SEED,
    )
    timings: dict[str, float] = {}
    try:
        record = store.get_run(settings.run_id)
        if record is None:
            raise RunNotFoundError(
                f"Run record {keys.run_record(settings.run_id)} not found in bucket "
                f"{settings.bucket}; the instance was started for an unknown run."
            )
        meta.data_key, meta.data_etag = record.data_key, record.data_etag
        meta.epochs = record.training_epochs or DEFAULT_EPOCHS
        meta.versions = library_versions()

        stage_started = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            data_path = Path(workdir) / "dataset.npz"
            with open(data_path, "wb") as data_file:
                store.download(record.data_key, record.data_etag, data_file)
            dataset = load_dataset(data_path)
        timings["download_s"] = time.perf_counter() - stage_started
        logger.info(
            "Dataset loaded: %d train and %d test images",
            len(dataset.x_train),
            len(dataset.x_test),
        )

        result = train_and_evaluate(dataset, epochs=meta.epochs, seed=DEFAULT_SEED)
        timings["fit_s"] = result.fit_seconds
        timings["evaluate_s"] = result.evaluate_seconds
        logger.info("Test accuracy %.4f", result.test_accuracy)

        stage_started = time.perf_counter()
        tflite_model, max_difference = export_tflite(result.model, dataset.x_test)
        smoke_images, smoke_labels = select_smoke_digits(
            result.model, dataset.x_test, dataset.y_test
        )
        with tempfile.TemporaryDirectory() as workdir:
            keras_path = Path(workdir) / "model.keras"
            result.model.save(keras_path)
            keras_model = keras_path.read_bytes()
        smoke = io.BytesIO()
        np.savez_compressed(smoke, images=smoke_images, labels=smoke_labels)
        timings["export_s"] = time.perf_counter() - stage_started
        logger.info(
            "Exported LiteRT model, largest probability difference %.2e", max_difference
        )

        # Model files first: train_meta.json is the trigger and comes last.
        stage_started = time.perf_counter()
        run_id = settings.run_id
        _upload(
            store, keys.keras_model(run_id), keras_model, "application/octet-stream"
        )
        _upload(
            store, keys.tflite_model(run_id), tflite_model, "application/octet-stream"
        )
        _upload(
            store,
            keys.smoke_digits(run_id),
            smoke.getvalue(),
            "application/octet-stream",
        )
        timings["upload_s"] = time.perf_counter() - stage_started

        meta.status = "succeeded"
        meta.test_accuracy = result.test_accuracy
        meta.test_loss = result.test_loss
        meta.val_accuracy = result.val_accuracy
        meta.history = result.history
        meta.artifacts = {
            "keras": keys.keras_model(run_id),
            "tflite": keys.tflite_model(run_id),
            "smoke_digits": keys.smoke_digits(run_id),
        }
    except Exception as exc:
        # Report every failure to the gate; the process still exits non-zero.
        logger.exception("Training run failed")
        meta.error = f"{type(exc).__name__}: {exc}"

    meta.timings = {name: round(seconds, 3) for name, seconds in timings.items()}
    meta.finished_at = utc_now()
    store.put_train_meta(meta)
    logger.info(
        "Wrote %s with status %s", keys.train_meta(settings.run_id), meta.status
    )

    return meta
