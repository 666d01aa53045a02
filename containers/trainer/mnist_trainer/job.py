"""One training run, from the run record to ``train_meta.json``.

Stages: read the run record and its hyperparameters, download the dataset,
resume from the run's checkpoint if an earlier instance left one, train
with a heartbeat and a checkpoint per epoch, evaluate on the test split,
render the report, export, upload the artifacts, then write
``train_meta.json`` last, because its arrival triggers the gate.

When any stage fails the trainer still writes a ``failed`` meta with the
error, so the gate terminates the instance and records the failure. When
the instance is being stopped or reclaimed, the trainer saves a checkpoint,
marks its progress ``interrupted`` and exits without a meta. The reaper
then starts a new instance for the run, which resumes from the checkpoint.
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
from mnist_pipeline import hyperparameters, keys
from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.records import (
    TrainingProgress,
    TrainingState,
    TrainMeta,
    utc_now,
)
from mnist_pipeline.settings import TrainerSettings
from mnist_pipeline.store import PipelineStore
from mnist_trainer.export import export_tflite, select_smoke_digits
from mnist_trainer.interruption import Interruption
from mnist_trainer.model import (
    evaluate_model,
    fit_model,
    split_validation,
    steps_per_epoch,
)
from mnist_trainer.progress import (
    Checkpoint,
    Heartbeat,
    StopOnInterruption,
    load_checkpoint,
)
from mnist_trainer.report import write_report

logger = logging.getLogger(__name__)


class RunNotFoundError(RuntimeError):
    """The run record the instance was started for does not exist."""


class TrainingInterrupted(Exception):
    """Training stopped for an interruption after saving a checkpoint."""


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


def _train(
    store: PipelineStore,
    settings: TrainerSettings,
    dataset: Dataset,
    chosen: hyperparameters.Hyperparameters,
    interruption: Interruption,
    meta: TrainMeta,
):
    """Fit the model, resuming the run's checkpoint when there is one."""
    run_id = settings.run_id
    if interruption.is_set():  # before the first batch: nothing to save
        raise TrainingInterrupted(interruption.reason)
    resumed = load_checkpoint(store, run_id)
    model, initial_epoch, history = None, 0, {}
    if resumed is not None:
        model, checkpoint = resumed
        initial_epoch, history = checkpoint.epochs_done, checkpoint.history
        meta.resumed_from_epoch = initial_epoch
        logger.info("Resuming from the checkpoint after epoch %d", initial_epoch)

    x_train, _, _, _ = split_validation(dataset, chosen.validation_size)
    heartbeat = Heartbeat(
        store,
        TrainingProgress(
            run_id=run_id,
            instance_id=settings.instance_id,
            state=TrainingState.TRAINING,
            epoch=initial_epoch + 1,
            epochs=chosen.epochs,
            batch=0,
            batches=steps_per_epoch(len(x_train), chosen.batch_size),
            updated_at=utc_now(),
            resumed_from_epoch=meta.resumed_from_epoch,
        ),
    )
    checkpoint = Checkpoint(
        store, run_id, settings.instance_id, interruption, history=history
    )
    model, history, fit_seconds = fit_model(
        dataset,
        chosen,
        callbacks=[heartbeat, checkpoint, StopOnInterruption(interruption)],
        resume_from=model,
        initial_epoch=initial_epoch,
        initial_history=history,
    )
    if interruption.is_set():
        heartbeat.write(TrainingState.INTERRUPTED)
        raise TrainingInterrupted(interruption.reason)

    heartbeat.write(TrainingState.FINISHED)
    return model, history, fit_seconds


def train_run(
    settings: TrainerSettings, s3: Any, interruption: Interruption | None = None
) -> TrainMeta | None:
    """Train the run named by ``settings`` and publish its artifacts.

    Returns the meta it wrote, or None when an interruption stopped it
    after it saved a checkpoint. Every exception is turned into a
    ``failed`` meta, because a trainer that dies silently would leave its
    GPU instance running until the reaper finds it.
    """
    store = PipelineStore(s3, settings.bucket)
    interruption = interruption or Interruption()
    started_at = utc_now()
    meta = TrainMeta(
        run_id=settings.run_id,
        status="failed",
        data_key="",
        data_etag="",
        started_at=started_at,
        finished_at=started_at,
        instance_id=settings.instance_id,
        code_version=settings.code_version,
    )
    timings: dict[str, float] = {}
    run_id = settings.run_id
    try:
        record = store.get_run(run_id)
        if record is None:
            raise RunNotFoundError(
                f"Run record {keys.run_record(run_id)} not found in bucket "
                f"{settings.bucket}; the instance was started for an unknown run."
            )
        meta.data_key, meta.data_etag = record.data_key, record.data_etag
        chosen = (
            hyperparameters.Hyperparameters.from_dict(record.hyperparameters)
            if record.hyperparameters
            else hyperparameters.resolve()
        )
        meta.hyperparameters = chosen.to_dict()
        meta.versions = library_versions()
        logger.info("Hyperparameters: %s", meta.hyperparameters)

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

        model, history, timings["fit_s"] = _train(
            store, settings, dataset, chosen, interruption, meta
        )
        evaluation = evaluate_model(model, dataset)
        timings["evaluate_s"] = evaluation.seconds
        logger.info("Test accuracy %.4f", evaluation.accuracy)

        stage_started = time.perf_counter()
        pictures, meta.per_class_accuracy = write_report(
            history, dataset.x_test, dataset.y_test, evaluation.probabilities
        )
        timings["report_s"] = time.perf_counter() - stage_started

        stage_started = time.perf_counter()
        tflite_model, max_difference = export_tflite(model, dataset.x_test)
        smoke_images, smoke_labels = select_smoke_digits(
            model, dataset.x_test, dataset.y_test
        )
        with tempfile.TemporaryDirectory() as workdir:
            keras_path = Path(workdir) / "model.keras"
            model.save(keras_path)
            keras_model = keras_path.read_bytes()
        smoke = io.BytesIO()
        np.savez_compressed(smoke, images=smoke_images, labels=smoke_labels)
        timings["export_s"] = time.perf_counter() - stage_started
        logger.info(
            "Exported LiteRT model, largest probability difference %.2e", max_difference
        )

        # Model files first: train_meta.json is the trigger and comes last.
        stage_started = time.perf_counter()
        binary = "application/octet-stream"
        artifacts = {
            "keras": (keys.keras_model(run_id), keras_model, binary),
            "tflite": (keys.tflite_model(run_id), tflite_model, binary),
            "smoke_digits": (keys.smoke_digits(run_id), smoke.getvalue(), binary),
        }
        for name, picture in pictures.items():
            artifacts[name.removesuffix(".png")] = (
                keys.report(run_id, name),
                picture,
                "image/png",
            )
        for key, body, content_type in artifacts.values():
            _upload(store, key, body, content_type)
        timings["upload_s"] = time.perf_counter() - stage_started

        meta.status = "succeeded"
        meta.test_accuracy = evaluation.accuracy
        meta.test_loss = evaluation.loss
        meta.val_accuracy = history["val_accuracy"][-1]
        meta.epochs_run = len(history["loss"])
        meta.history = history
        meta.artifacts = {name: key for name, (key, _, _) in artifacts.items()}
    except TrainingInterrupted as exc:
        logger.warning("Training interrupted, checkpoint saved: %s", exc)
        return None
    except Exception as exc:
        # Report every failure to the gate; the process still exits non-zero.
        logger.exception("Training run failed")
        meta.error = f"{type(exc).__name__}: {exc}"

    meta.timings = {name: round(seconds, 3) for name, seconds in timings.items()}
    meta.finished_at = utc_now()
    store.put_train_meta(meta)
    logger.info("Wrote %s with status %s", keys.train_meta(run_id), meta.status)

    return meta
