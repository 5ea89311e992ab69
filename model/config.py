"""Defaults for a training run, in one place.

`train.py` builds its flags from these values and the library functions take a
`TrainConfig`; nothing else in the project hard-codes a hyper-parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BACKENDS = ("jax", "tensorflow", "torch")
# Lightning's spelling (model/devices.py): "auto" takes GPUs when the framework sees any.
ACCELERATORS = ("auto", "cpu", "gpu")
STEPS = ("keras", "native")
# "fast": TiledMaxPooling2D (model/cnn.py); "stock": keras.layers.MaxPooling2D.
POOLINGS = ("fast", "stock")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    # Peak Adam learning rate; it decays to zero along a cosine over the whole run.
    lr: float = 2e-3
    # The learning rate first rises linearly from 0 to lr over this many epochs (a fraction
    # is fine), then the cosine runs over the rest (Keras' CosineDecay warm-up). 0: none.
    warmup_epochs: float = 0.0
    # Cross-entropy against labels smoothed towards uniform: (1 - this) on the label and
    # this / 10 on every class (as Keras' label_smoothing). 0: the plain one-hot label.
    label_smoothing: float = 0.0
    seed: int = 0
    # Keep an exponential moving average of the weights (Keras' Adam(use_ema=True)); the
    # trained model is the average. None turns it off.
    ema_momentum: float | None = 0.999
    # Held out from the 60,000 training images with a seeded permutation.
    validation_size: int = 5000
    # Training-time augmentation, drawn per image and epoch from the seed: a shift of up
    # to shift_pixels on each axis, a rotation of up to rotation_degrees and a scale in
    # [1 - zoom, 1 + zoom]. All zero turns it off; rotation and zoom zero give exact
    # whole-pixel shifts.
    shift_pixels: float = 2.0
    rotation_degrees: float = 10.0
    zoom: float = 0.1
    # The name in RECIPES whose values this config took (train.py --recipe); recorded in
    # run.json and the resume checkpoint. Set it with with_recipe(), which applies them.
    recipe: str = "default"
    # Lightning-style quick-check knobs.
    limit_train_batches: int | None = None
    dry_run: bool = False
    # "keras": Keras' built-in train_step; "native": the backends/ step.
    step: str = "keras"
    # One of POOLINGS.
    pooling: str = "fast"
    data: str | None = None
    output_dir: str = "runs/latest"
    resume: bool = False
    # Replace a previous run in output_dir (without it, a new run there is refused).
    overwrite: bool = False
    # Whether steps are compiled (XLA for JAX/TF); None lets each backend use its fastest.
    jit_compile: bool | None = None
    # Stop once the test accuracy, checked at each epoch end, reaches this (e.g. 0.99);
    # None trains every epoch (model/target_accuracy.py).
    target_accuracy: float | None = None
    # Data-parallel training (model/devices.py): devices per machine, machines, this
    # machine's rank and the rank-0 machine's HOST:PORT (needed when num_nodes > 1).
    # batch_size is the global batch, split evenly over devices * num_nodes replicas.
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    coordinator: str | None = None
    # A collective that waits longer than this (a worker died or hangs) stops the run.
    collective_timeout_s: float = 300.0

    # A dry run is "a few batches, one epoch".
    DRY_RUN_BATCHES = 5

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def with_recipe(self, name: str, keep=()) -> "TrainConfig":
        """This config with recipe `name`'s values, except the fields named in `keep`
        (train.py: the flags given explicitly, which win over the recipe)."""
        if name not in RECIPES:
            raise ValueError(f"Unknown recipe. Received: recipe={name!r}; valid: {', '.join(RECIPES)}")
        return self.replace(recipe=name, **{field: value for field, value in RECIPES[name].items() if field not in keep})

    def effective(self) -> "TrainConfig":
        """The config the run really uses once --dry-run has been applied."""
        if self.dry_run:
            limit = self.limit_train_batches or self.DRY_RUN_BATCHES
            return self.replace(epochs=1, limit_train_batches=min(limit, self.DRY_RUN_BATCHES))
        return self

    @property
    def world_size(self) -> int:
        """How many replicas train: one per device on every machine."""
        return self.devices * self.num_nodes

    @property
    def drop_last(self) -> bool:
        """Whether an epoch's last, smaller batch is left out (MNISTDataModule.drop_last):
        with several replicas every batch must split evenly over them."""
        return self.world_size > 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named recipes (train.py --recipe NAME): each a set of TrainConfig values over its defaults.
# "fast" trains 2 epochs (README: "Recipes"; its 3-seed runs are in benchmarks/results/):
# a 10x higher peak learning rate after a warm-up, so that the cosine anneals a well-moved
# net in 860 steps; label smoothing; no weight average (momentum 0.999 would still hold 42%
# of the first step's weights after 860 steps). Measured on JAX, seed 0, 2 epochs, test
# accuracy: lr 2e-3 98.10%, 6e-3 98.62%, 1e-2 98.78%; 1e-2 with the augmentation 98.85%,
# and with label smoothing 0.1 too 99.03%; 2e-2 with the augmentation 98.99% (TF: 98.99%).
# At lr 2e-2, 3 seeds on each backend: seed 1 ended at 98.93-98.95%. At 1e-2 (README):
# JAX seeds 0-2 99.01-99.04%, TensorFlow seed 1 98.99% (one image short of 99%).
RECIPES: dict[str, dict] = {
    "default": {},
    "fast": {"epochs": 2, "lr": 1e-2, "warmup_epochs": 0.3, "label_smoothing": 0.1, "ema_momentum": None},
}

# The settings that define a run's maths, each with the flag that sets it: stored in the
# resume checkpoint, and refused on --resume when a flag asks for another value.
RUN_SETTINGS = {
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
    "limit_train_batches": "--limit-train-batches", "step": "--step", "pooling": "--pooling",
    "shift_pixels": "--no-augment", "rotation_degrees": "--no-augment", "zoom": "--no-augment",
    "ema_momentum": None, "validation_size": None, "warmup_epochs": None, "label_smoothing": None,
    "recipe": "--recipe",
}
# Run settings added after checkpoints were first written, with the value every run before
# them had: a checkpoint that lacks one trained with that value.
RUN_SETTINGS_ADDED = {"warmup_epochs": 0.0, "label_smoothing": 0.0, "recipe": "default"}
# Seeds feed numpy's generator, which takes 0 to 2**32 - 1.
SEED_RANGE = (0, 2**32 - 1)

# The model predict.py and export.py use unless told otherwise: what train.py writes by default.
DEFAULT_MODEL = f"{TrainConfig.output_dir}/model.keras"
