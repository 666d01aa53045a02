"""Schemas of the JSON documents the pipeline writes to S3.

Each document is a dataclass with `to_json` and `from_json`. `from_json`
rejects a document with missing or mistyped fields and ignores unknown
fields, so a newer writer does not break an older reader.
"""

import dataclasses
import datetime
import enum
import json
import types
import typing
from typing import Any, Self

from mnist_pipeline.exceptions import InvalidRecordError

SCHEMA_VERSION = 1


class RunStatus(enum.StrEnum):
    """Life cycle of one upload, stored in its run record."""

    REJECTED = "rejected"  # the dataset failed its check; nothing started
    TRAINING = "training"  # a trainer instance was started
    FAILED = "failed"  # training, launching or the new server failed
    NOT_PROMOTED = "not_promoted"  # trained, but the gate kept the old model
    PROMOTING = "promoting"  # a new server is starting with this model
    PROMOTED = "promoted"  # the new server is healthy and serving


class Decision(enum.StrEnum):
    PROMOTE = "promote"
    REJECT = "reject"


def rollback_failure(requested_at: str) -> str:
    """Return the words that mark a failed rollback in its run's reason."""
    return f"Rollback requested at {requested_at} failed"


def utc_now() -> str:
    """Return the current time as an ISO 8601 UTC string with seconds."""
    now = datetime.datetime.now(datetime.UTC)

    return now.isoformat(timespec="seconds").replace("+00:00", "Z")


class _Document:
    """JSON round trip and field validation shared by every schema."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        name = cls.__name__
        if not isinstance(data, dict):
            raise InvalidRecordError(f"{name} must be a JSON object, got {data!r:.80}")

        hints = typing.get_type_hints(cls)
        values = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in data:
                required = (
                    field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                )
                if required:
                    raise InvalidRecordError(f"{name} is missing field {field.name!r}")
                continue
            values[field.name] = _coerce(
                name, field.name, hints[field.name], data[field.name]
            )

        return cls(**values)

    @classmethod
    def from_json(cls, body: bytes | str) -> Self:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InvalidRecordError(
                f"{cls.__name__} is not valid JSON: {exc}"
            ) from exc

        return cls.from_dict(data)


def _coerce(record: str, field: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's type hint and convert enums."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None

    for option in allowed:
        origin = typing.get_origin(option) or option
        if isinstance(origin, type) and issubclass(origin, enum.Enum):
            try:
                return origin(value)
            except ValueError:
                continue
        if (
            origin is float
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            return float(value)
        if origin is int and isinstance(value, bool):
            continue
        if origin is not type(None) and isinstance(value, origin):
            return value

    raise InvalidRecordError(f"{record}.{field} has invalid value {value!r:.80}")


@dataclasses.dataclass
class RunRecord(_Document):
    """State of one run, at ``runs/<run_id>.json``; the gate updates it."""

    run_id: str
    status: RunStatus
    data_key: str
    data_etag: str
    created_at: str
    updated_at: str
    data_size: int | None = None
    hyperparameters: dict | None = None  # `Hyperparameters.to_dict()`
    reason: str | None = None
    warnings: list | None = None  # dataset problems that did not block the run
    train_size: int | None = None
    test_size: int | None = None
    trainer_instance_id: str | None = None
    trainer_started_at: str | None = None  # of the latest trainer instance
    test_accuracy: float | None = None
    serving_version: str | None = None
    serving_test_accuracy: float | None = None
    decision: Decision | None = None
    server_instance_id: str | None = None
    server_url: str | None = None
    # Set while a user-requested rollback to this run's model is under way;
    # such a cutover skips the accuracy rule.
    rollback_requested_at: str | None = None
    # Trainer instances started for this run; above 1 after a resume.
    trainer_attempts: int = 1
    schema_version: int = SCHEMA_VERSION

    def update(self, **changes: Any) -> None:
        """Set fields and refresh ``updated_at``."""
        for name, value in changes.items():
            if not hasattr(self, name):
                raise AttributeError(f"RunRecord has no field {name!r}")
            setattr(self, name, value)
        self.updated_at = utc_now()


@dataclasses.dataclass
class TrainMeta(_Document):
    """Outcome of one training run, at ``models/<run_id>/train_meta.json``.

    The trainer writes it last, after every model file, so its arrival
    means the artifacts it names exist. A ``failed`` meta carries the
    error and no accuracy.
    """

    run_id: str
    status: str  # "succeeded" or "failed"
    data_key: str
    data_etag: str
    started_at: str
    finished_at: str
    instance_id: str | None = None
    error: str | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    val_accuracy: float | None = None
    hyperparameters: dict | None = None  # `Hyperparameters.to_dict()`
    epochs_run: int | None = None  # fewer than asked when the target stopped it
    resumed_from_epoch: int | None = None  # set when a checkpoint was resumed
    history: dict | None = None  # per-epoch lists keyed by Keras metric name
    per_class_accuracy: list | None = None  # test accuracy of digits 0-9
    timings: dict | None = None  # seconds per stage
    versions: dict | None = None  # library name to version
    code_version: str | None = None
    artifacts: dict | None = None  # artifact kind to S3 key
    schema_version: int = SCHEMA_VERSION

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class TrainingState(enum.StrEnum):
    TRAINING = "training"
    INTERRUPTED = "interrupted"  # saved a checkpoint and exited; resumable
    FINISHED = "finished"  # train_meta.json follows


@dataclasses.dataclass
class TrainingProgress(_Document):
    """A trainer's heartbeat, at ``models/<run_id>/progress.json``.

    Rewritten at least once per epoch and every few seconds within one.
    """

    run_id: str
    instance_id: str
    state: TrainingState
    epoch: int  # the epoch under way, from 1
    epochs: int
    batch: int  # batches done in this epoch
    batches: int  # batches per epoch
    updated_at: str
    accuracy: float | None = None  # train accuracy so far in this epoch
    val_accuracy: float | None = None  # after the last finished epoch
    eta_s: float | None = None  # seconds until the last epoch ends
    resumed_from_epoch: int | None = None
    schema_version: int = SCHEMA_VERSION


@dataclasses.dataclass
class TrainingCheckpoint(_Document):
    """Description of ``models/<run_id>/checkpoint.keras``, written after it.

    ``epochs_done`` counts finished epochs. A checkpoint saved on an
    interruption contains the weights and optimizer state from within the next
    epoch, and a resumed run starts that epoch again with them.
    """

    run_id: str
    epochs_done: int
    history: dict  # per-epoch lists keyed by Keras metric name
    saved_at: str
    instance_id: str
    schema_version: int = SCHEMA_VERSION


@dataclasses.dataclass
class ServingPointer(_Document):
    """The model version users get, at ``serving/current.json``."""

    model_version: str
    test_accuracy: float
    instance_id: str
    url: str
    since: str
    previous_version: str | None = None
    previous_instance_id: str | None = None
    schema_version: int = SCHEMA_VERSION


@dataclasses.dataclass
class ServerReady(_Document):
    """A server's report that it loaded its model and passed the smoke check.

    Written by the server to ``serving/ready/<instance_id>.json``.
    """

    instance_id: str
    model_version: str
    url: str
    ready_at: str
    smoke_correct: int
    smoke_total: int
    schema_version: int = SCHEMA_VERSION


@dataclasses.dataclass
class RollbackRequest(_Document):
    """A user's request to serve an earlier model version again.

    Written by ``mnist-pipeline rollback`` to ``serving/requests/<time>.json``.
    """

    model_version: str
    requested_at: str
    schema_version: int = SCHEMA_VERSION
