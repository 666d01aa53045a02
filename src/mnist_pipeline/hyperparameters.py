"""Training recipes and the hyperparameters a user can set per run.

A recipe names a model and its training schedule. The trainer owns the
models (``mnist_trainer.model``) and this module owns the numbers, so the
launcher can check a run request without TensorFlow:

``seed``
    The original design: the baseline CNN, Adam at a constant rate,
    batch 64, 10% of the train split held out for validation.
``default``
    The baseline's convolutions (28 and 64 filters) with dropout around a
    256-unit dense layer, batch 128, the learning rate warmed up and then
    cosine-decayed, and random shifts of up to one pixel.
``fast``
    Half the baseline's filters on the same schedule for 3 epochs; stops
    early once the validation accuracy reaches its target.

A user picks a recipe and overrides its numbers per upload with S3 object
metadata on the dataset, for example::

    aws s3 cp mnist.npz s3://BUCKET/data/mnist.npz \\
        --metadata train-recipe=fast,train-epochs=3,train-seed=7

or ``mnist-pipeline upload SOURCE --recipe fast --epochs 3 --seed 7``. The
launcher parses the metadata with `from_metadata` and rejects the upload
before any instance starts when a value is invalid.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from mnist_pipeline.exceptions import PipelineError

METADATA_PREFIX = "train-"
RECIPE_NAMES = ("seed", "default", "fast")


class InvalidRunRequestError(PipelineError):
    """A dataset's training metadata names an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The settings that decide how one run trains on its data."""

    recipe: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    validation_size: int  # train images held out for validation
    augment_pixels: int  # largest random shift in pixels; 0 for none
    target_accuracy: float | None  # stop once validation accuracy reaches it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Hyperparameters":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: data[name] for name in names})


RECIPES = {
    "seed": Hyperparameters(
        recipe="seed",
        epochs=5,
        batch_size=64,
        learning_rate=0.001,
        seed=1234,
        validation_size=6000,
        augment_pixels=0,
        target_accuracy=None,
    ),
    "default": Hyperparameters(
        recipe="default",
        epochs=5,
        batch_size=128,
        learning_rate=0.003,
        seed=1234,
        validation_size=5000,
        augment_pixels=1,
        target_accuracy=None,
    ),
    "fast": Hyperparameters(
        recipe="fast",
        epochs=3,
        batch_size=128,
        learning_rate=0.004,
        seed=1234,
        validation_size=5000,
        augment_pixels=0,
        target_accuracy=0.992,
    ),
}
DEFAULT_RECIPE = "default"


def _integer(low: int, high: int):
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _rate(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be above 0 and at most 1")
    return value


def _target(raw: str) -> float | None:
    if raw.lower() in ("", "none"):
        return None
    return _rate(raw)


# Metadata key (after METADATA_PREFIX) to field name, parser and example.
_FIELDS = {
    "epochs": ("epochs", _integer(1, 200), "5"),
    "batch-size": ("batch_size", _integer(8, 4096), "128"),
    "learning-rate": ("learning_rate", _rate, "0.003"),
    "seed": ("seed", _integer(0, 2**31 - 1), "7"),
    "validation-size": ("validation_size", _integer(100, 1_000_000), "5000"),
    "augment-pixels": ("augment_pixels", _integer(0, 8), "2"),
    "target-accuracy": ("target_accuracy", _target, "0.99 or none"),
}
METADATA_KEYS = ("recipe", *_FIELDS)


def resolve(recipe: str = DEFAULT_RECIPE, epochs: int | None = None) -> Hyperparameters:
    """Return a recipe's hyperparameters, with ``epochs`` overridden if given."""
    if recipe not in RECIPES:
        raise InvalidRunRequestError(
            f"Unknown recipe {recipe!r}; choose one of {', '.join(RECIPE_NAMES)}."
        )
    chosen = RECIPES[recipe]
    if epochs:
        chosen = dataclasses.replace(chosen, epochs=epochs)
    return chosen


def from_metadata(
    metadata: Mapping[str, str],
    base: Hyperparameters,
    prefix: str = METADATA_PREFIX,
) -> Hyperparameters:
    """Apply a dataset's ``train-*`` object metadata to ``base``.

    S3 returns user metadata keys in lower case without ``x-amz-meta-``.
    Keys without the ``train-`` prefix belong to other tools and are
    ignored. ``train-recipe`` switches to that recipe's numbers first; the
    other keys then override single values. Error messages name each key
    with ``prefix`` in place of ``train-``, so the CLI can name its options.

    Raises
    ------
    InvalidRunRequestError
        For unknown ``train-*`` keys or values out of range, naming every
        such key, its value and what is allowed.
    """
    request = {
        key[len(METADATA_PREFIX) :]: value.strip()
        for key, value in metadata.items()
        if key.lower().startswith(METADATA_PREFIX)
    }
    unknown = sorted(set(request) - set(METADATA_KEYS))
    if unknown:
        given = ", ".join(prefix + key for key in unknown)
        allowed = ", ".join(prefix + key for key in METADATA_KEYS)
        raise InvalidRunRequestError(
            f"Unknown training metadata {given}; allowed keys are {allowed}. "
            "Fix the key or remove it and upload again."
        )

    problems = []
    chosen = base
    if "recipe" in request:
        recipe = request.pop("recipe")
        if recipe in RECIPES:
            chosen = RECIPES[recipe]
        else:
            problems.append(
                f"Unknown recipe {recipe!r} in {prefix}recipe; choose one of "
                f"{', '.join(RECIPE_NAMES)}"
            )
    changes: dict[str, Any] = {}
    for key, raw in request.items():
        field, parse, example = _FIELDS[key]
        try:
            changes[field] = parse(raw)
        except ValueError as exc:
            problems.append(
                f"{prefix}{key}={raw!r} is invalid ({exc}); give a value like "
                f"{prefix}{key}={example}"
            )
    if problems:
        raise InvalidRunRequestError(
            f"Invalid training metadata: {'. '.join(problems)}. "
            "Fix it and upload again."
        )

    return dataclasses.replace(chosen, **changes)
