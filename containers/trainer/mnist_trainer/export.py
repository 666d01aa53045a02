"""Export a trained model for serving and prove the export is faithful.

The server runs the model with LiteRT (``ai-edge-litert``), not TensorFlow.
`export_tflite` converts the Keras model, then runs both on real test
digits and raises unless every prediction agrees. A model that fails this
check is never published.
"""

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from mnist_trainer.model import as_model_input

# Largest allowed difference of any class probability between the Keras
# model and the LiteRT model on the checked digits.
PROBABILITY_TOLERANCE = 1e-4
CHECK_DIGITS = 1000
SMOKE_DIGITS_PER_CLASS = 2


class ExportMismatchError(RuntimeError):
    """The exported model does not reproduce the Keras model's predictions."""


def predict_tflite(model_content: bytes, images: np.ndarray) -> np.ndarray:
    """Return LiteRT class probabilities for uint8 images, one at a time."""
    interpreter = Interpreter(model_content=model_content)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    outputs = []
    for image in as_model_input(images):
        interpreter.set_tensor(input_index, image[np.newaxis])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index)[0].copy())

    return np.stack(outputs)


def export_tflite(model, x_test: np.ndarray) -> tuple[bytes, float]:
    """Convert ``model`` to a LiteRT flatbuffer and check it on test digits.

    Returns the flatbuffer and the largest probability difference seen.

    Raises
    ------
    ExportMismatchError
        When any checked digit gets another class, or a probability differs
        by more than `PROBABILITY_TOLERANCE`.
    """
    model_content = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    images = x_test[:CHECK_DIGITS]
    expected = model.predict(as_model_input(images), batch_size=512, verbose=0)
    actual = predict_tflite(model_content, images)

    disagreements = int(np.sum(expected.argmax(axis=1) != actual.argmax(axis=1)))
    max_difference = float(np.max(np.abs(expected - actual)))
    if disagreements or max_difference > PROBABILITY_TOLERANCE:
        raise ExportMismatchError(
            f"The LiteRT model disagrees with the Keras model on {disagreements} of "
            f"{len(images)} test digits, with a largest probability difference of "
            f"{max_difference:.2e} (tolerance {PROBABILITY_TOLERANCE:.0e})."
        )

    return model_content, max_difference


def select_smoke_digits(
    model, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pick test digits of every class that the model classifies confidently.

    A new server must classify all of them correctly before it takes
    traffic, which catches a corrupt or mismatched model file.
    """
    probabilities = model.predict(as_model_input(x_test), batch_size=512, verbose=0)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)

    chosen = []
    for digit in range(10):
        candidates = np.flatnonzero((y_test == digit) & (predicted == digit))
        best = candidates[np.argsort(-confidence[candidates])][:SMOKE_DIGITS_PER_CLASS]
        chosen.extend(best.tolist())

    return x_test[chosen], y_test[chosen]
