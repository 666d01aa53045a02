"""Settings of each component, read once from environment variables.

Every environment variable the pipeline reads is named here. The Lambda
functions get theirs from template.yaml, the containers from the launch
template's user data and the instance's tags (see `instances`), and the
local cloud sets the same variables for its processes.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

from mnist_pipeline.exceptions import SettingsError

BUCKET_NAME = "BUCKET_NAME"
TRAINER_LAUNCH_TEMPLATE_ID = "TRAINER_LAUNCH_TEMPLATE_ID"
SERVER_LAUNCH_TEMPLATE_ID = "SERVER_LAUNCH_TEMPLATE_ID"
STACK_NAME = "STACK_NAME"
TRAINING_EPOCHS = "TRAINING_EPOCHS"
ACCURACY_THRESHOLD = "ACCURACY_THRESHOLD"
ACCURACY_TOLERANCE = "ACCURACY_TOLERANCE"
RUN_ID = "RUN_ID"
MODEL_VERSION = "MODEL_VERSION"
INSTANCE_ID = "INSTANCE_ID"
ADVERTISED_URL = "ADVERTISED_URL"
HOST = "HOST"
PORT = "PORT"
MAX_UPLOAD_BYTES = "MAX_UPLOAD_BYTES"
MAX_BATCH_FILES = "MAX_BATCH_FILES"
MAX_TRAINING_MINUTES = "MAX_TRAINING_MINUTES"
SERVER_START_MINUTES = "SERVER_START_MINUTES"

T = TypeVar("T")


def _read(
    environ: Mapping[str, str],
    name: str,
    parse: Callable[[str], T],
    default: T | None = None,
    check: Callable[[T], bool] = lambda value: True,
    expected: str = "",
) -> T:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise SettingsError(f"Environment variable {name} is missing; set it.")
        return default

    try:
        value = parse(raw)
    except ValueError as exc:
        raise SettingsError(
            f"Environment variable {name}={raw!r} is invalid: expected {expected}."
        ) from exc
    if not check(value):
        raise SettingsError(
            f"Environment variable {name}={raw!r} is invalid: expected {expected}."
        )

    return value


def _fraction(environ: Mapping[str, str], name: str, default: float) -> float:
    return _read(
        environ, name, float, default, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1"
    )


def _positive(environ: Mapping[str, str], name: str, default: int, unit: str) -> int:
    return _read(
        environ, name, int, default, lambda v: v > 0, f"a positive number of {unit}"
    )


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    bucket: str
    trainer_launch_template_id: str
    stack_name: str
    training_epochs: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "LauncherSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            trainer_launch_template_id=_read(environ, TRAINER_LAUNCH_TEMPLATE_ID, str),
            stack_name=_read(environ, STACK_NAME, str),
            training_epochs=_read(
                environ,
                TRAINING_EPOCHS,
                int,
                5,
                lambda v: 1 <= v <= 200,
                "an integer from 1 to 200",
            ),
        )


@dataclasses.dataclass(frozen=True)
class GateSettings:
    bucket: str
    server_launch_template_id: str
    stack_name: str
    accuracy_threshold: float
    accuracy_tolerance: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "GateSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            server_launch_template_id=_read(environ, SERVER_LAUNCH_TEMPLATE_ID, str),
            stack_name=_read(environ, STACK_NAME, str),
            accuracy_threshold=_fraction(environ, ACCURACY_THRESHOLD, 0.95),
            accuracy_tolerance=_fraction(environ, ACCURACY_TOLERANCE, 0.005),
        )


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    bucket: str
    run_id: str
    instance_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "TrainerSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            run_id=_read(environ, RUN_ID, str),
            instance_id=_read(environ, INSTANCE_ID, str, "unknown"),
        )


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    bucket: str
    model_version: str
    instance_id: str
    advertised_url: str
    host: str
    port: int
    max_upload_bytes: int
    max_batch_files: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServerSettings":
        port = _read(
            environ, PORT, int, 8000, lambda v: 0 < v < 65536, "a TCP port number"
        )
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            model_version=_read(environ, MODEL_VERSION, str),
            instance_id=_read(environ, INSTANCE_ID, str, "unknown"),
            advertised_url=_read(
                environ, ADVERTISED_URL, str, f"http://127.0.0.1:{port}"
            ),
            # Containers listen on every interface; the local cloud sets 127.0.0.1.
            host=_read(environ, HOST, str, "0.0.0.0"),  # noqa: S104
            port=port,
            max_upload_bytes=_positive(
                environ, MAX_UPLOAD_BYTES, 5 * 1024 * 1024, "bytes"
            ),
            max_batch_files=_positive(environ, MAX_BATCH_FILES, 32, "files"),
        )


@dataclasses.dataclass(frozen=True)
class ReaperSettings:
    bucket: str
    max_training_minutes: int
    server_start_minutes: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ReaperSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            max_training_minutes=_positive(
                environ, MAX_TRAINING_MINUTES, 60, "minutes"
            ),
            server_start_minutes=_positive(
                environ, SERVER_START_MINUTES, 15, "minutes"
            ),
        )
