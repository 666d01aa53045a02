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

from mnist_pipeline import __version__, hyperparameters
from mnist_pipeline.exceptions import SettingsError

BUCKET_NAME = "BUCKET_NAME"
TRAINER_LAUNCH_TEMPLATE_ID = "TRAINER_LAUNCH_TEMPLATE_ID"
SERVER_LAUNCH_TEMPLATE_ID = "SERVER_LAUNCH_TEMPLATE_ID"
STACK_NAME = "STACK_NAME"
TRAINING_RECIPE = "TRAINING_RECIPE"
TRAINING_EPOCHS = "TRAINING_EPOCHS"
ACCURACY_THRESHOLD = "ACCURACY_THRESHOLD"
ACCURACY_TOLERANCE = "ACCURACY_TOLERANCE"
RUN_ID = "RUN_ID"
MODEL_VERSION = "MODEL_VERSION"
INSTANCE_ID = "INSTANCE_ID"
CODE_VERSION = "CODE_VERSION"
ADVERTISED_URL = "ADVERTISED_URL"
HOST = "HOST"
PORT = "PORT"
MAX_UPLOAD_BYTES = "MAX_UPLOAD_BYTES"
MAX_BATCH_FILES = "MAX_BATCH_FILES"
MAX_TRAINING_MINUTES = "MAX_TRAINING_MINUTES"
SERVER_START_MINUTES = "SERVER_START_MINUTES"
HEARTBEAT_MINUTES = "HEARTBEAT_MINUTES"
MAX_TRAINER_ATTEMPTS = "MAX_TRAINER_ATTEMPTS"
SUBNET_IDS = "SUBNET_IDS"
USE_SPOT = "USE_SPOT"
SERVER_GRACE_SECONDS = "SERVER_GRACE_SECONDS"
SERVING_ALLOCATION_ID = "SERVING_ALLOCATION_ID"
SERVING_URL = "SERVING_URL"

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


def _subnet_ids(environ: Mapping[str, str]) -> tuple[str, ...]:
    """Read SUBNET_IDS: comma-separated subnet ids, in the order to try them.

    Empty means no subnet is named and EC2 picks one in the default VPC.
    """
    raw = environ.get(SUBNET_IDS, "")
    subnet_ids = tuple(part.strip() for part in raw.split(",") if part.strip())
    invalid = [value for value in subnet_ids if not value.startswith("subnet-")]
    if invalid:
        raise SettingsError(
            f"Environment variable {SUBNET_IDS}={raw!r} is invalid: {invalid[0]!r} "
            "is not a subnet id; expected ids like subnet-0123abcd separated by "
            "commas (the SubnetIds template parameter)."
        )
    if len(set(subnet_ids)) != len(subnet_ids):
        raise SettingsError(
            f"Environment variable {SUBNET_IDS}={raw!r} is invalid: it names a "
            "subnet twice; list each subnet once."
        )

    return subnet_ids


def _parse_boolean(raw: str) -> bool:
    if raw.lower() not in ("true", "false"):
        raise ValueError(raw)

    return raw.lower() == "true"


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    return _read(environ, name, _parse_boolean, default, expected="true or false")


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    bucket: str
    trainer_launch_template_id: str
    stack_name: str
    training_recipe: str = hyperparameters.DEFAULT_RECIPE
    training_epochs: int = 0  # 0: the recipe's number of epochs
    # Subnets to try in order when one has no capacity; empty lets EC2 pick.
    subnet_ids: tuple[str, ...] = ()
    # Start trainers as Spot Instances first, then On-Demand.
    use_spot: bool = False

    @property
    def hyperparameters(self) -> hyperparameters.Hyperparameters:
        """The stack's hyperparameters, before a run's own metadata."""
        return hyperparameters.resolve(self.training_recipe, self.training_epochs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "LauncherSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            trainer_launch_template_id=_read(environ, TRAINER_LAUNCH_TEMPLATE_ID, str),
            stack_name=_read(environ, STACK_NAME, str),
            training_recipe=_read(
                environ,
                TRAINING_RECIPE,
                str,
                hyperparameters.DEFAULT_RECIPE,
                lambda v: v in hyperparameters.RECIPE_NAMES,
                f"one of {', '.join(hyperparameters.RECIPE_NAMES)}",
            ),
            training_epochs=_read(
                environ,
                TRAINING_EPOCHS,
                int,
                0,
                lambda v: 0 <= v <= 200,
                "an integer from 0 (the recipe's) to 200",
            ),
            subnet_ids=_subnet_ids(environ),
            use_spot=_boolean(environ, USE_SPOT, False),
        )


@dataclasses.dataclass(frozen=True)
class GateSettings:
    bucket: str
    server_launch_template_id: str
    stack_name: str
    accuracy_threshold: float
    accuracy_tolerance: float
    # The Elastic IP that users reach the serving model at, and its URL.
    # Without them the gate only moves serving/current.json.
    serving_allocation_id: str | None = None
    serving_url: str | None = None
    # Subnets to try in order when one has no capacity; empty lets EC2 pick.
    subnet_ids: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "GateSettings":
        allocation_id = _read(environ, SERVING_ALLOCATION_ID, str, "")
        serving_url = _read(
            environ,
            SERVING_URL,
            str,
            "",
            lambda v: v.startswith(("http://", "https://")),
            "an http:// or https:// URL",
        )
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            server_launch_template_id=_read(environ, SERVER_LAUNCH_TEMPLATE_ID, str),
            stack_name=_read(environ, STACK_NAME, str),
            accuracy_threshold=_fraction(environ, ACCURACY_THRESHOLD, 0.95),
            accuracy_tolerance=_fraction(environ, ACCURACY_TOLERANCE, 0.005),
            serving_allocation_id=allocation_id or None,
            serving_url=serving_url.rstrip("/") or None,
            subnet_ids=_subnet_ids(environ),
        )


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    bucket: str
    run_id: str
    instance_id: str
    # The commit the image was built from (a build argument of the trainer's
    # Dockerfile); the package version when unknown.
    code_version: str = __version__

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "TrainerSettings":
        return cls(
            bucket=_read(environ, BUCKET_NAME, str),
            run_id=_read(environ, RUN_ID, str),
            instance_id=_read(environ, INSTANCE_ID, str, "unknown"),
            code_version=_read(environ, CODE_VERSION, str, __version__),
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
    stack_name: str
    # How long a replaced server keeps running after the cutover.
    server_grace_seconds: int = 300
    # A running trainer silent for longer is hung: terminated, run failed.
    heartbeat_minutes: int = 15
    # An ended trainer that left a checkpoint is restarted, up to this many
    # instances per run in all. Without a launch template nothing restarts.
    max_trainer_attempts: int = 3
    trainer_launch_template_id: str = ""
    subnet_ids: tuple[str, ...] = ()
    use_spot: bool = False

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
            stack_name=_read(environ, STACK_NAME, str),
            server_grace_seconds=_read(
                environ,
                SERVER_GRACE_SECONDS,
                int,
                300,
                lambda v: v >= 0,
                "a whole number of seconds, 0 or more",
            ),
            heartbeat_minutes=_positive(environ, HEARTBEAT_MINUTES, 15, "minutes"),
            max_trainer_attempts=_positive(
                environ, MAX_TRAINER_ATTEMPTS, 3, "instances"
            ),
            trainer_launch_template_id=_read(
                environ, TRAINER_LAUNCH_TEMPLATE_ID, str, ""
            ),
            subnet_ids=_subnet_ids(environ),
            use_spot=_boolean(environ, USE_SPOT, False),
        )
