"""The CNN, its training recipe and its evaluation.

The model takes 28x28x1 float32 pixel values from 0 (background) to 255
(ink), the values of the dataset's uint8 images. A Rescaling layer inside
the model maps them to 0-1, so every caller feeds raw pixel values.
"""

import dataclasses
import time

import keras
import numpy as np

from mnist_pipeline.dataset import IMAGE_SIZE, NUM_CLASSES, Dataset

# Baseline recipe: the original design's model and hyperparameters.
BATCH_SIZE = 64
VALIDATION_SPLIT = 0.1
DEFAULT_EPOCHS = 5
DEFAULT_SEED = 1234


@dataclasses.dataclass
class TrainingResult:
    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    val_accuracy: float
    fit_seconds: float
    evaluate_seconds: float


def make_model() -> keras.Model:
    """Build the baseline CNN: two conv/pool blocks and a small dense head."""
    model = keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ],
        name="mnist_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    return model


def as_model_input(images: np.ndarray) -> np.ndarray:
    """Turn uint8 images of shape (N, 28, 28) into the model's float input."""
    return images.astype(np.float32)[..., np.newaxis]


def train_and_evaluate(
    dataset: Dataset,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    verbose: int = 2,
) -> TrainingResult:
    """Train on the train split and evaluate on the held-out test split.

    The last 10% of the train split is the validation set (Keras'
    ``validation_split``). The test split is never seen during training, so
    its accuracy is the number the gate trusts.
    """
    keras.utils.set_random_seed(seed)
    model = make_model()

    started = time.perf_counter()
    history = model.fit(
        as_model_input(dataset.x_train),
        dataset.y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_split=VALIDATION_SPLIT,
        verbose=verbose,
    )
    fit_seconds = time.perf_counter() - started

    started = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(
        as_model_input(dataset.x_test), dataset.y_test, batch_size=512, verbose=0
    )
    evaluate_seconds = time.perf_counter() - started

    per_epoch = {
        name: [float(v) for v in values] for name, values in history.history.items()
    }

    return TrainingResult(
        model=model,
        history=per_epoch,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        val_accuracy=per_epoch["val_accuracy"][-1],
        fit_seconds=fit_seconds,
        evaluate_seconds=evaluate_seconds,
    )
