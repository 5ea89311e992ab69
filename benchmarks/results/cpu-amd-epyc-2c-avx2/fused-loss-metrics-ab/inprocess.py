"""Keras fit on torch with and without fuse_loss_and_metrics, interleaved in one process.

    python benchmarks/results/cpu-amd-epyc-2c-avx2/fused-loss-metrics-ab/inprocess.py [ROUNDS]

Two seeded CNNModules (the default recipe's settings, both with fuse_optimizer, one also
with fuse_loss_and_metrics) train in turn on the same 30 batches of 128 (one `fit` call of
30 steps, the data as CPU tensors, as the Trainer feeds them); each round runs both, the
order alternating. Prints each side's median ms a step and the median of the per-round
ratios fused / Keras' with a 95% bootstrap CI (the benchmark's confidence.py).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from model.runtime import select_backend  # noqa: E402

select_backend("torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends import torch_backend  # noqa: E402
from benchmarks.confidence import paired_ratio_ci  # noqa: E402
from model.data import MNISTDataModule  # noqa: E402
from model.module import CNNModule  # noqa: E402

STEPS, BATCH = 30, 128
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
datamodule = MNISTDataModule(batch_size=BATCH, seed=0).setup()
images = torch.from_numpy(datamodule.x_train[: STEPS * BATCH].copy())
labels = torch.from_numpy(datamodule.y_train[: STEPS * BATCH].copy())
modules = {}
for fused in (False, True):
    module = CNNModule(decay_steps=10**6, seed=0).configure()
    torch_backend.fuse_optimizer(module.optimizer)
    if fused:
        torch_backend.fuse_loss_and_metrics(module)
    modules[fused] = module


def ms_per_step(module) -> float:
    batches = ((images[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS))
    started = time.perf_counter()
    module.fit(batches, steps_per_epoch=STEPS, epochs=1, verbose=0)
    return (time.perf_counter() - started) / STEPS * 1e3


for module in modules.values():  # warm-up: Keras builds its metrics and step function
    ms_per_step(module)
times = {False: [], True: []}
for index in range(rounds):
    for fused in ((False, True) if index % 2 == 0 else (True, False)):
        times[fused].append(ms_per_step(modules[fused]))
keras, fused = np.array(times[False]), np.array(times[True])
ratio, low, high = paired_ratio_ci(fused, keras)
print(f"{rounds} rounds of {STEPS} steps: Keras' loss and metrics {np.median(keras):.2f} ms a step, fused "
      f"{np.median(fused):.2f}; fused / Keras' {ratio:.3f} [{low:.3f}-{high:.3f}], "
      f"median difference {np.median(keras - fused):.2f} ms")
