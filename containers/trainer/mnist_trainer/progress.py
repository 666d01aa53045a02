"""Keras callbacks that keep a run observable and resumable from S3.

`Heartbeat` rewrites ``models/<run_id>/progress.json`` at every epoch end
and every few seconds within an epoch. `Checkpoint` saves the model with
its optimizer state to ``models/<run_id>/checkpoint.keras`` after every
epoch, then ``checkpoint.json``. `StopOnInterruption` ends training at the
next batch once an `Interruption` fired, saves a checkpoint and lets the
job exit cleanly.
"""

import logging
import tempfile
import time
from pathlib import Path

import keras

from mnist_pipeline import keys
from mnist_pipeline.records import (
    TrainingCheckpoint,
    TrainingProgress,
    TrainingState,
    utc_now,
)
from mnist_pipeline.store import PipelineStore
from mnist_trainer.interruption import Interruption

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0


class Heartbeat(keras.callbacks.Callback):
    """Write the trainer's progress to S3 at least once per epoch."""

    def __init__(
        self,
        store: PipelineStore,
        progress: TrainingProgress,
        every_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        super().__init__()
        self.store = store
        self.progress = progress
        self.every_seconds = every_seconds
        self._last_write = 0.0
        self._started = 0.0
        self._done_batches = 0

    def write(self, state: TrainingState | None = None) -> None:
        if state is not None:
            self.progress.state = state
        self.progress.updated_at = utc_now()
        self.store.put_progress(self.progress)
        self._last_write = time.monotonic()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._started = time.monotonic()
        self.write(TrainingState.TRAINING)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.progress.epoch = epoch + 1
        self.progress.batch = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._done_batches += 1
        self.progress.batch = batch + 1
        if time.monotonic() - self._last_write < self.every_seconds:
            return
        if logs and "accuracy" in logs:
            self.progress.accuracy = float(logs["accuracy"])
        self.progress.eta_s = self._eta()
        self.write()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self.progress.batch = self.progress.batches
        if "accuracy" in logs:
            self.progress.accuracy = float(logs["accuracy"])
        if "val_accuracy" in logs:
            self.progress.val_accuracy = float(logs["val_accuracy"])
        self.progress.eta_s = self._eta()
        self.write()

    def _eta(self) -> float | None:
        if not self._done_batches:
            return None
        per_batch = (time.monotonic() - self._started) / self._done_batches
        left = (self.progress.epochs - self.progress.epoch) * self.progress.batches
        left += self.progress.batches - self.progress.batch
        return round(per_batch * left, 1)


def save_checkpoint(
    store: PipelineStore,
    model: keras.Model,
    run_id: str,
    instance_id: str,
    epochs_done: int,
    history: dict[str, list[float]],
) -> None:
    """Upload the model with its optimizer state, then its description."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "checkpoint.keras"
        model.save(path)
        # A few MB: one PUT, so a failed upload leaves nothing half-written.
        store.s3.put_object(
            Bucket=store.bucket,
            Key=keys.checkpoint_model(run_id),
            Body=path.read_bytes(),
            ContentType="application/octet-stream",
        )
    store.put_checkpoint(
        TrainingCheckpoint(
            run_id=run_id,
            epochs_done=epochs_done,
            history=history,
            saved_at=utc_now(),
            instance_id=instance_id,
        )
    )


def load_checkpoint(
    store: PipelineStore, run_id: str
) -> tuple[keras.Model, TrainingCheckpoint] | None:
    """Return the run's checkpointed model and state, or None if it has none."""
    state = store.get_checkpoint(run_id)
    if state is None:
        return None
    body = store.get_bytes(keys.checkpoint_model(run_id))
    if body is None:
        return None
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "checkpoint.keras"
        path.write_bytes(body)
        model = keras.saving.load_model(path, safe_mode=True)
    return model, state


class Checkpoint(keras.callbacks.Callback):
    """Save a resumable checkpoint to S3 after every epoch.

    Keras still ends an epoch that `StopOnInterruption` cut short. That
    epoch does not count as done: the checkpoint keeps its weights, and a
    resumed run trains the epoch again.
    """

    def __init__(
        self,
        store: PipelineStore,
        run_id: str,
        instance_id: str,
        interruption: Interruption,
        history: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.run_id = run_id
        self.instance_id = instance_id
        self.interruption = interruption
        self.history = {name: list(values) for name, values in (history or {}).items()}
        self.epochs_done = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.interruption.is_set():
            self.epochs_done = epoch
        else:
            for name, value in (logs or {}).items():
                self.history.setdefault(name, []).append(float(value))
            self.epochs_done = epoch + 1
        self.save()

    def save(self) -> None:
        save_checkpoint(
            self.store,
            self.model,
            self.run_id,
            self.instance_id,
            self.epochs_done,
            self.history,
        )


class StopOnInterruption(keras.callbacks.Callback):
    """End training at the next batch once the instance is being taken away."""

    def __init__(self, interruption: Interruption) -> None:
        super().__init__()
        self.interruption = interruption

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.interruption.is_set():
            logger.warning("Stopping training: %s", self.interruption.reason)
            self.model.stop_training = True
