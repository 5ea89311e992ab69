"""Train a small but decent CNN for the predict and export tests, in its own process:

    python tests/small_model.py OUTPUT_DIR STEPS

The recipe's defaults for one epoch of STEPS batches, without the weight average (whose
0.999 momentum lags far behind a run this short: 84% test accuracy after 300 steps,
97% without it) and without label smoothing (the model the predict tests were written for). Writes OUTPUT_DIR/model.keras (train.py's own writer) and
OUTPUT_DIR/test_probabilities.npy, the model's probabilities on the 10,000 test arrays.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.runtime import select_backend  # noqa: E402

select_backend()

import numpy as np  # noqa: E402

from model.checkpoint import load_model  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.data import load_mnist, scale_images  # noqa: E402
from model.training import train_and_evaluate  # noqa: E402

output = Path(sys.argv[1])
# Plain labels: the predict tests' expected digits and README's figures are this model's.
config = TrainConfig(epochs=1, limit_train_batches=int(sys.argv[2]), ema_momentum=None, label_smoothing=0.0,
                     output_dir=str(output))
result = train_and_evaluate(config, log=lambda *args: None)
(_, _), (x_test, _) = load_mnist()
probabilities = load_model(output / "model.keras").predict(scale_images(x_test), batch_size=1000, verbose=0)
np.save(output / "test_probabilities.npy", np.asarray(probabilities, dtype=np.float32))
print(f"test accuracy {result['test_accuracy']:.4f}")
