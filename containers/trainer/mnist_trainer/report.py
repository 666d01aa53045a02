"""Pictures and numbers that explain one trained model.

`write_report` renders, from the training history and the test split's
predicted probabilities:

``learning_curves.png``
    loss and accuracy per epoch, train and validation;
``confusion_matrix.png``
    true digit against predicted digit over the test split;
``worst_digits.png``
    the misclassified test digits the model was most confident about,
    each titled with its true and predicted digit.

It also returns the test accuracy of each digit.
"""

import io

import numpy as np
from matplotlib.figure import Figure

from mnist_pipeline.dataset import NUM_CLASSES

WORST_DIGITS = 25
REPORT_FILES = ("learning_curves.png", "confusion_matrix.png", "worst_digits.png")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Return counts indexed by [true digit, predicted digit]."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Return each digit's accuracy; None for a digit absent from the test split."""
    totals = matrix.sum(axis=1)
    return [
        round(float(matrix[digit, digit] / totals[digit]), 6) if totals[digit] else None
        for digit in range(NUM_CLASSES)
    ]


def _png(figure: Figure) -> bytes:
    # Figure without pyplot renders with Agg and keeps no global state.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def learning_curves(history: dict[str, list[float]]) -> bytes:
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for name, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(name, [])
            epochs = range(1, len(values) + 1)
            axis.plot(epochs, values, marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Learning curves")
    return _png(figure)


def confusion_picture(matrix: np.ndarray) -> bytes:
    figure = Figure(figsize=(7, 6))
    axis = figure.subplots()
    # Log colours, so that the few errors show next to the large diagonal.
    image = axis.imshow(np.log1p(matrix), cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if row == column else "black"
            axis.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color=colour,
            )
    axis.set_xticks(range(NUM_CLASSES))
    axis.set_yticks(range(NUM_CLASSES))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title("Confusion matrix, test split")
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return _png(figure)


def worst_digits(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray
) -> bytes:
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    worst = wrong[np.argsort(-confidence)][:WORST_DIGITS]

    columns = 5
    rows = max(1, -(-len(worst) // columns))
    figure = Figure(figsize=(columns * 1.6, rows * 1.8))
    axes = figure.subplots(rows, columns)
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, index in zip(np.atleast_1d(axes).ravel(), worst, strict=False):
        axis.imshow(images[index], cmap="gray_r")
        axis.set_title(
            f"{labels[index]} read as {predicted[index]}\n"
            f"{probabilities[index, predicted[index]]:.0%}",
            fontsize=8,
        )
    figure.suptitle(f"Most confident mistakes ({len(wrong)} in all)")
    return _png(figure)


def write_report(
    history: dict[str, list[float]],
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
) -> tuple[dict[str, bytes], list[float | None]]:
    """Return the report's PNG files by name, and the per-digit accuracy."""
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1))
    pictures = {
        "learning_curves.png": learning_curves(history),
        "confusion_matrix.png": confusion_picture(matrix),
        "worst_digits.png": worst_digits(images, labels, probabilities),
    }
    return pictures, per_class_accuracy(matrix)
