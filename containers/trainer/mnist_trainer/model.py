"""The CNNs of each recipe, their training loop and their evaluation.

Every model takes 28x28x1 float32 pixel values from 0 (background) to 255
(ink), the values of the dataset's uint8 images. A Rescaling layer inside
the model maps them to 0-1, so every caller feeds raw pixel values.

Training keeps the whole train split in memory as uint8 (47 MB for MNIST)
and converts each batch to float32 as it is drawn. The numbers of each
recipe live in `mnist_pipeline.hyperparameters`; the models live here.
"""

import dataclasses
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from mnist_pipeline.dataset import IMAGE_SIZE, NUM_CLASSES, Dataset
from mnist_pipeline.hyperparameters import DEFAULT_RECIPE, Hyperparameters, resolve

EVALUATE_BATCH_SIZE = 1000
# Share of the steps spent warming the learning rate up before it decays.
WARMUP_SHARE = 0.25


@dataclasses.dataclass
class Evaluation:
    """A model's scores on the test split."""

    loss: float
    accuracy: float
    probabilities: np.ndarray  # (N, 10) class probabilities per test image
    seconds: float


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """How to use the machine: XLA and mixed precision pay off on a GPU only."""

    device: str  # "gpu" or "cpu"
    jit_compile: bool
    mixed_precision: bool


def plan_for(gpus: Sequence[object]) -> DevicePlan:
    """Choose XLA and mixed precision from the visible GPUs."""
    if gpus:
        return DevicePlan("gpu", jit_compile=True, mixed_precision=True)
    return DevicePlan("cpu", jit_compile=False, mixed_precision=False)


def _baseline_cnn() -> list[keras.layers.Layer]:
    """Return the original design's CNN: two conv/pool blocks, a small dense head."""
    layers = keras.layers
    return [
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
    ]


def _regularised_cnn(
    first: int = 28, second: int = 64, dense: int = 256, dropout: float = 0.3
) -> list[keras.layers.Layer]:
    """Return the baseline's conv/pool blocks with dropout around a wider dense layer.

    28 first filters instead of 32 pay for the dense layer's 256 units.
    """
    layers = keras.layers
    return [
        layers.Conv2D(first, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(second, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dropout(dropout),
        layers.Dense(dense, activation="relu"),
        layers.Dropout(dropout),
    ]


def _small_cnn() -> list[keras.layers.Layer]:
    """Half the baseline's filters: about a third of its multiply-adds."""
    return _regularised_cnn(first=16, second=32, dense=128, dropout=0.2)


BODIES = {"seed": _baseline_cnn, "default": _regularised_cnn, "fast": _small_cnn}


def make_model(
    hyperparameters: Hyperparameters, steps: int, plan: DevicePlan | None = None
) -> keras.Model:
    """Build and compile the recipe's model for ``steps`` optimizer steps."""
    plan = plan or plan_for([])
    body = BODIES[hyperparameters.recipe]()
    model = keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            keras.layers.Rescaling(1.0 / 255),
            *body,
            # float32 output keeps the softmax exact under mixed precision.
            keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name=f"mnist_cnn_{hyperparameters.recipe}",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(_learning_rate(hyperparameters, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=plan.jit_compile,
    )

    return model


def _learning_rate(hyperparameters: Hyperparameters, steps: int):
    """Constant for the seed recipe; warm up, then cosine decay, otherwise."""
    peak = hyperparameters.learning_rate
    if hyperparameters.recipe == "seed":
        return peak
    warmup = max(1, int(WARMUP_SHARE * steps))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 25,
        decay_steps=max(1, steps - warmup),
        warmup_target=peak,
        warmup_steps=warmup,
        alpha=1e-3,
    )


def as_model_input(images: np.ndarray) -> np.ndarray:
    """Turn uint8 images of shape (N, 28, 28) into the model's float input."""
    return images.astype(np.float32)[..., np.newaxis]


def training_batches(
    images: np.ndarray, labels: np.ndarray, hyperparameters: Hyperparameters
) -> tf.data.Dataset:
    """Shuffled float32 batches drawn from uint8 images held in memory."""
    count = len(images)
    batches = (
        tf.data.Dataset.from_tensor_slices((images[..., np.newaxis], labels))
        .shuffle(count, seed=hyperparameters.seed, reshuffle_each_iteration=True)
        .batch(
            hyperparameters.batch_size,
            drop_remainder=count >= 2 * hyperparameters.batch_size,
        )
        .map(
            lambda x, y: (tf.cast(x, tf.float32), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    )
    if hyperparameters.augment_pixels:
        shift = hyperparameters.augment_pixels / IMAGE_SIZE
        # Whole-pixel shifts: nearest needs no interpolation and keeps ink crisp.
        translate = keras.layers.RandomTranslation(
            shift,
            shift,
            fill_mode="constant",
            interpolation="nearest",
            seed=hyperparameters.seed,
        )
        batches = batches.map(
            lambda x, y: (translate(x, training=True), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    return batches.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(train_count: int, batch_size: int) -> int:
    if train_count >= 2 * batch_size:
        return train_count // batch_size
    return -(-train_count // batch_size)


class StopAtAccuracy(keras.callbacks.Callback):
    """Stop training once the validation accuracy reaches a target."""

    def __init__(self, target: float) -> None:
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (logs or {}).get("val_accuracy", 0.0) >= self.target:
            self.model.stop_training = True


def split_validation(
    dataset: Dataset, validation_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out the last ``validation_size`` train images, at most a tenth."""
    held_out = min(validation_size, len(dataset.x_train) // 10)
    cut = len(dataset.x_train) - held_out
    return (
        dataset.x_train[:cut],
        dataset.y_train[:cut],
        dataset.x_train[cut:],
        dataset.y_train[cut:],
    )


def fit_model(
    dataset: Dataset,
    hyperparameters: Hyperparameters,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    resume_from: keras.Model | None = None,
    initial_epoch: int = 0,
    initial_history: dict[str, list[float]] | None = None,
    plan: DevicePlan | None = None,
    verbose: int = 2,
) -> tuple[keras.Model, dict[str, list[float]], float]:
    """Train on the train split; return the model, its history and fit seconds.

    The last images of the train split are the validation set; the test
    split is never seen here. ``resume_from`` continues a checkpointed
    model, with its optimizer state, at ``initial_epoch``, and
    ``initial_history`` holds the epochs it already trained.
    """
    plan = plan or plan_for(tf.config.list_physical_devices("GPU"))
    if plan.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    # The seed fixes initial weights, data order, shifts and dropout. Only
    # the order of threaded float sums still varies; TensorFlow's
    # deterministic ops would fix that too but cost a third more time.
    keras.utils.set_random_seed(hyperparameters.seed + initial_epoch)

    x_train, y_train, x_val, y_val = split_validation(
        dataset, hyperparameters.validation_size
    )
    steps = steps_per_epoch(len(x_train), hyperparameters.batch_size)
    model = resume_from or make_model(
        hyperparameters, steps * hyperparameters.epochs, plan
    )
    all_callbacks = list(callbacks)
    if hyperparameters.target_accuracy is not None:
        all_callbacks.append(StopAtAccuracy(hyperparameters.target_accuracy))

    started = time.perf_counter()
    history = model.fit(
        training_batches(x_train, y_train, hyperparameters),
        epochs=hyperparameters.epochs,
        initial_epoch=initial_epoch,
        validation_data=(as_model_input(x_val), y_val),
        validation_batch_size=EVALUATE_BATCH_SIZE,
        callbacks=all_callbacks,
        verbose=verbose,
    )
    fit_seconds = time.perf_counter() - started

    per_epoch = {name: list(values) for name, values in (initial_history or {}).items()}
    for name, values in history.history.items():
        per_epoch.setdefault(name, []).extend(float(value) for value in values)

    return model, per_epoch, fit_seconds


def evaluate_model(model: keras.Model, dataset: Dataset) -> Evaluation:
    """Score ``model`` on the test split, the number the gate trusts."""
    started = time.perf_counter()
    x_test = as_model_input(dataset.x_test)
    probabilities = model.predict(x_test, batch_size=EVALUATE_BATCH_SIZE, verbose=0)
    probabilities = probabilities.astype(np.float64)
    labels = dataset.y_test.astype(np.int64)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)

    return Evaluation(
        loss=float(-np.log(picked).mean()),
        accuracy=float((probabilities.argmax(axis=1) == labels).mean()),
        probabilities=probabilities,
        seconds=time.perf_counter() - started,
    )


@dataclasses.dataclass
class TrainingResult:
    model: keras.Model
    history: dict[str, list[float]]
    fit_seconds: float
    evaluation: Evaluation


def train_and_evaluate(
    dataset: Dataset,
    hyperparameters: Hyperparameters | None = None,
    *,
    epochs: int | None = None,
    plan: DevicePlan | None = None,
    verbose: int = 0,
) -> TrainingResult:
    """Fit a recipe (the default one unless given) and score it on the test split."""
    chosen = hyperparameters or resolve(DEFAULT_RECIPE)
    if epochs:
        chosen = dataclasses.replace(chosen, epochs=epochs)
    model, history, fit_seconds = fit_model(dataset, chosen, plan=plan, verbose=verbose)
    return TrainingResult(model, history, fit_seconds, evaluate_model(model, dataset))
