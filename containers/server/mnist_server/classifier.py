"""The served model: a LiteRT interpreter behind a lock.

LiteRT interpreters are not thread-safe, and FastAPI runs synchronous
routes on a thread pool, so every call into the interpreter holds the lock.
One inference of the CNN takes well under a millisecond, so the lock costs
less than the HTTP handling around it.
"""

import io
import threading

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class SmokeCheckError(RuntimeError):
    """The model misclassified a digit it must get right."""


class DigitClassifier:
    """Classify 28x28 uint8 digits with one LiteRT model."""

    def __init__(self, model_content: bytes, model_version: str) -> None:
        self.model_version = model_version
        self._lock = threading.Lock()
        self._interpreter = Interpreter(model_content=model_content, num_threads=1)
        self._interpreter.allocate_tensors()
        self._input_index = self._interpreter.get_input_details()[0]["index"]
        self._output_index = self._interpreter.get_output_details()[0]["index"]

    def predict(self, digit: np.ndarray) -> np.ndarray:
        """Return the ten class probabilities of one 28x28 uint8 digit."""
        model_input = digit.astype(np.float32).reshape(1, 28, 28, 1)
        with self._lock:
            self._interpreter.set_tensor(self._input_index, model_input)
            self._interpreter.invoke()
            probabilities = self._interpreter.get_tensor(self._output_index)[0].copy()

        return probabilities

    def check_smoke_digits(self, smoke_npz: bytes) -> int:
        """Classify the run's smoke digits; raise unless all are correct.

        Returns the number of digits checked.
        """
        with np.load(io.BytesIO(smoke_npz), allow_pickle=False) as smoke:
            images, labels = smoke["images"], smoke["labels"]
        predicted = np.array([self.predict(image).argmax() for image in images])
        wrong = int(np.sum(predicted != labels))
        if wrong or len(labels) == 0:
            raise SmokeCheckError(
                f"Model {self.model_version} misclassified {wrong} of {len(labels)} "
                "smoke digits; the model file is corrupt or does not match its run."
            )

        return len(labels)
