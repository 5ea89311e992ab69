"""Stop training once the test accuracy reaches a target (`train.py --target-accuracy A`,
and the benchmark's time-to-accuracy cells).

The test accuracy is checked at each epoch end, as DAWNBench does, on the weights fit()
would return at that point: with Adam's weight average on (the recipe's default), the
average, swapped in for the check only by Keras' own `SwapEMAWeights`. The time the
check takes is recorded apart, so a benchmark can leave it out of the training time.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from model.config import TrainConfig


class StopAtTargetAccuracy(keras.callbacks.Callback):
    """Check the accuracy on (images, labels) after every epoch; stop when it is >= target.

    `records` gets one dict per epoch: epoch, test_accuracy, epoch_end (perf_counter when
    the epoch's training and validation ended) and evaluation_s (the check's own time)."""

    def __init__(self, images, labels, target: float, log=print, batch_size: int = TrainConfig.eval_batch_size):
        super().__init__()
        self.images, self.labels, self.target = images, np.asarray(labels), target
        self.log, self.batch_size = log, batch_size
        self.records: list[dict] = []
        self.reached_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        ended = time.perf_counter()
        ema = getattr(self.model.optimizer, "use_ema", False)
        swapper = keras.callbacks.SwapEMAWeights()
        swapper.set_model(self.model)
        if ema:
            swapper.on_test_begin()  # the moving average in place of the weights
        try:
            probabilities = self.model.predict(self.images, batch_size=self.batch_size, verbose=0)
        finally:
            if ema:
                swapper.on_test_end()
        accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == self.labels))
        self.records.append({"epoch": epoch + 1, "test_accuracy": accuracy, "epoch_end": ended,
                             "evaluation_s": time.perf_counter() - ended})
        if accuracy >= self.target and self.reached_epoch is None:
            self.reached_epoch = epoch + 1
            self.model.stop_training = True
            self.log(f"test accuracy {accuracy:.4f} reached the target {self.target} after epoch {epoch + 1}; "
                     "stopping training there (--target-accuracy)")
