"""Checks that need a Keras backend, run in a subprocess that holds one backend for life.

    KERAS_BACKEND=jax python tests/backend_checks.py OUT.json WORKDIR CHECK [CHECK ...]

Each check returns plain measurements (numbers, lists); the pytest side asserts on them,
so a failure message shows the values. Several checks share one process because
importing a framework costs seconds.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


@check
def architecture(workdir: Path) -> dict:
    from model.cnn import build_cnn

    result = {}
    for pooling in ("fast", "stock"):
        network = build_cnn(pooling)
        result[pooling] = {
            "layers": [[layer.name, list(layer.output.shape[1:]), layer.count_params()] for layer in network.layers],
            "total_params": network.count_params(),
        }
    return result


@check
def short_training(workdir: Path) -> dict:
    """64 real Adam steps (2 epochs x 32 batches of 128 real MNIST images)."""
    import keras

    from model.cnn import seeded_weights
    from model.data import MNISTDataModule
    from model.module import CNNModule
    from model.trainer import Trainer

    datamodule = MNISTDataModule(batch_size=128, seed=0, limit_train_batches=32).setup()
    module = CNNModule(lr=1e-3)
    module.network.set_weights(seeded_weights(module.network, 0))
    trainer = Trainer(max_epochs=2, verbose=0)
    before = trainer.test(module, datamodule)
    module = trainer.fit(module, datamodule)
    after = trainer.test(module, datamodule)
    return {
        "test_loss_before": before["test_loss"],
        "test_loss_after": after["test_loss"],
        "test_accuracy_after": after["test_accuracy"],
        "train_loss_per_epoch": [h["loss"] for h in trainer.history],
        "steps": int(keras.ops.convert_to_numpy(module.optimizer.iterations)),
    }


def main(argv: list[str]) -> int:
    out, workdir, names = Path(argv[0]), Path(argv[1]), argv[2:]
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        started = time.perf_counter()
        try:
            results[name] = {"ok": True, "value": CHECKS[name](workdir / name)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
