"""S3 key layout of the pipeline bucket.

::

    data/<name>.npz                       uploaded datasets (launcher trigger)
    runs/<run_id>.json                    run record, one per upload
    locks/uploads/<digest>.json           first-event-wins lock per upload
    models/<run_id>/model.keras           trained Keras model
    models/<run_id>/model.tflite          model for the server's runtime
    models/<run_id>/smoke.npz             known test digits for smoke checks
    models/<run_id>/progress.json         the trainer's heartbeat
    models/<run_id>/checkpoint.keras      latest epoch's model and optimizer
    models/<run_id>/checkpoint.json       what the checkpoint holds
    models/<run_id>/report/*.png          learning curves, confusion matrix,
                                          worst misclassified test digits
    models/<run_id>/train_meta.json       written last (gate trigger)
    serving/current.json                  the model version users get
    serving/history/<time>-<version>.json each version that served, from when
    serving/ready/<instance_id>.json      a new server is healthy (gate trigger)
    serving/requests/<time>.json          a rollback request (gate trigger)

The S3 event filters in template.yaml match ``data/`` + ``.npz``,
``models/`` + ``train_meta.json``, ``serving/ready/`` + ``.json`` and
``serving/requests/`` + ``.json``; the
pipeline never writes a key under ``data/``, so its own writes cannot start
a run.
"""

import datetime
import hashlib
import re

DATA_PREFIX = "data/"
DATASET_SUFFIX = ".npz"
RUNS_PREFIX = "runs/"
MODELS_PREFIX = "models/"
TRAIN_META_NAME = "train_meta.json"
SERVING_CURRENT = "serving/current.json"
SERVER_READY_PREFIX = "serving/ready/"
SERVING_HISTORY_PREFIX = "serving/history/"
SERVING_REQUESTS_PREFIX = "serving/requests/"
UPLOAD_LOCKS_PREFIX = "locks/uploads/"

_RUN_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")


def is_dataset(key: str) -> bool:
    """Return whether ``key`` is an uploaded dataset that starts a run."""
    return key.startswith(DATA_PREFIX) and key.endswith(DATASET_SUFFIX)


def is_valid_run_id(run_id: str) -> bool:
    """Return whether ``run_id`` has the form ``YYYYMMDDTHHMMSSZ-xxxxxxxx``."""
    return bool(_RUN_ID.match(run_id))


def run_record(run_id: str) -> str:
    return f"{RUNS_PREFIX}{run_id}.json"


def model_prefix(run_id: str) -> str:
    return f"{MODELS_PREFIX}{run_id}/"


def keras_model(run_id: str) -> str:
    return f"{model_prefix(run_id)}model.keras"


def tflite_model(run_id: str) -> str:
    return f"{model_prefix(run_id)}model.tflite"


def smoke_digits(run_id: str) -> str:
    return f"{model_prefix(run_id)}smoke.npz"


def progress(run_id: str) -> str:
    return f"{model_prefix(run_id)}progress.json"


def checkpoint_model(run_id: str) -> str:
    return f"{model_prefix(run_id)}checkpoint.keras"


def checkpoint_state(run_id: str) -> str:
    return f"{model_prefix(run_id)}checkpoint.json"


def report(run_id: str, name: str) -> str:
    return f"{model_prefix(run_id)}report/{name}"


def train_meta(run_id: str) -> str:
    return f"{model_prefix(run_id)}{TRAIN_META_NAME}"


def run_id_from_train_meta(key: str) -> str | None:
    """Return the run id in a ``models/<run_id>/train_meta.json`` key, or None."""
    parts = key.split("/")
    if len(parts) != 3 or f"{parts[0]}/" != MODELS_PREFIX:
        return None
    if parts[2] != TRAIN_META_NAME or not is_valid_run_id(parts[1]):
        return None

    return parts[1]


def server_ready(instance_id: str) -> str:
    return f"{SERVER_READY_PREFIX}{instance_id}.json"


def is_server_ready(key: str) -> bool:
    return key.startswith(SERVER_READY_PREFIX) and key.endswith(".json")


def upload_lock(data_key: str, etag: str, version_id: str | None = None) -> str:
    """Return the lock key of one version of an upload.

    Every delivery of the same S3 event maps to the same lock, so only the
    first one that creates it starts a trainer. In a versioned bucket the
    version id distinguishes two uploads of the same bytes.
    """
    identity = f"{data_key}\n{etag}\n{version_id or ''}"
    digest = hashlib.sha256(identity.encode()).hexdigest()

    return f"{UPLOAD_LOCKS_PREFIX}{digest}.json"


def _compact_time(timestamp: str) -> str:
    """Turn ``2026-12-04T15:00:00Z`` into ``20261204T150000Z`` for sorting keys."""
    return timestamp.replace("-", "").replace(":", "")


def serving_history(recorded_at: datetime.datetime, model_version: str) -> str:
    """Return a history entry's key; keys sort in the order entries were made."""
    stamp = recorded_at.strftime("%Y%m%dT%H%M%S.%fZ")

    return f"{SERVING_HISTORY_PREFIX}{stamp}-{model_version}.json"


def serving_request(requested_at: str) -> str:
    return f"{SERVING_REQUESTS_PREFIX}{_compact_time(requested_at)}.json"


def is_serving_request(key: str) -> bool:
    return key.startswith(SERVING_REQUESTS_PREFIX) and key.endswith(".json")
