"""Defaults for a training run, in one place.

Each `TrainConfig` field that is a command-line flag carries its help in its metadata
(`setting(...)`); `train.py` builds its parser from the fields
(`model.arguments.add_config_flags`), so a new setting is one edit here. The library
functions and roles (module, data module, trainer) take their settings from a
`TrainConfig`; nothing else in the project hard-codes a hyper-parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.arguments import accuracy_fraction, flag_of, int_in_range, positive_float, positive_int

BACKENDS = ("jax", "tensorflow", "torch")
# Lightning's spelling (model/devices.py): "auto" takes GPUs when the framework sees any.
ACCELERATORS = ("auto", "cpu", "gpu")
STEPS = ("keras", "native")
# "fast": TiledMaxPooling2D (model/cnn.py); "stock": keras.layers.MaxPooling2D.
POOLINGS = ("fast", "stock")
# Seeds feed numpy's generator, which takes 0 to 2**32 - 1.
SEED_RANGE = (0, 2**32 - 1)
# The flag that turns the augmentation settings off together (train.py).
NO_AUGMENT = "--no-augment"
DEVICES_GROUP = "more than one device (data parallel)"
# A dry run is "one epoch of a few batches" (Lightning's fast_dev_run).
DRY_RUN_BATCHES = 5


# Named recipes (train.py --recipe NAME): each a set of TrainConfig values over its defaults.
# "fast" trains 2 epochs (README: "Recipes"; its 3-seed runs are in benchmarks/results/):
# a 5x higher peak learning rate after a warm-up, so that the cosine anneals a well-moved
# net in 860 steps; Adam's moment averages over about 5 and 100 steps (betas 0.8, 0.99)
# instead of 10 and 1,000, a run's length: 10 seeds' mean 99.01 -> 99.12%; the default's
# label smoothing (TrainConfig's, so not repeated here); no weight average (momentum 0.999
# would still hold 42% of the first step's weights after 860 steps). Batches of 96 at lr
# 8e-3 reached the same accuracy over 9 runs in a third more steps. What each lever did,
# and the 3-seed results: README, "Recipes".
RECIPES: dict[str, dict] = {
    "default": {},
    "fast": {"epochs": 2, "lr": 1e-2, "warmup_epochs": 0.3, "adam_beta_1": 0.8, "adam_beta_2": 0.99,
             "ema_momentum": None},
}


def setting(default, help: str | None = None, *, flag: str | None = None, run_setting: bool = False, **argparse):
    """A TrainConfig field. With `help` it is a command-line flag (`flag`, default
    `--field-name`; `argparse` holds add_argument's type, choices, metavar, group and
    default_text, the text shown when the default value alone says too little). A
    `run_setting` defines the run's maths: stored in the resume checkpoint and refused on
    --resume when a flag asks for another value."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "run_setting": run_setting,
                                                         "argparse": argparse})


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(30, "epochs to train", run_setting=True, type=positive_int)
    batch_size: int = setting(128, "training batch size: the global batch, split evenly over all devices",
                              run_setting=True, type=positive_int)
    lr: float = setting(2e-3, "peak Adam learning rate (cosine decay to 0 over the run)", run_setting=True,
                        type=positive_float)
    # The learning rate first rises linearly from 0 to lr over this many epochs (a fraction
    # is fine), then the cosine runs over the rest (Keras' CosineDecay warm-up). 0: none.
    warmup_epochs: float = setting(0.0, run_setting=True)
    # Adam's decay rates of its gradient and squared-gradient averages (Keras' beta_1 and
    # beta_2; these defaults are Keras').
    adam_beta_1: float = setting(0.9, run_setting=True)
    adam_beta_2: float = setting(0.999, run_setting=True)
    # Cross-entropy against labels smoothed towards uniform: (1 - this) on the label and
    # this / 10 on every class (as Keras' label_smoothing). 0: the plain one-hot label.
    # 0.1 with 30 epochs took the default recipe from 99.18-99.30% (20 epochs, none) to
    # 99.33-99.45% (JAX, 3 seeds; README, "Recipes").
    label_smoothing: float = setting(0.1, run_setting=True)
    seed: int = setting(0, f"seed for weights, split, order and augmentation, {SEED_RANGE[0]} to {SEED_RANGE[1]}",
                        run_setting=True, type=int_in_range(*SEED_RANGE))
    # Keep an exponential moving average of the weights (Keras' Adam(use_ema=True)); the
    # trained model is the average. None turns it off.
    ema_momentum: float | None = setting(0.999, run_setting=True)
    # Held out from the 60,000 training images with a seeded permutation.
    validation_size: int = setting(5000, run_setting=True)
    # Training-time augmentation, drawn per image and epoch from the seed: a shift of up
    # to shift_pixels on each axis, a rotation of up to rotation_degrees and a scale in
    # [1 - zoom, 1 + zoom]. All zero (--no-augment) turns it off; rotation and zoom zero
    # give exact whole-pixel shifts.
    shift_pixels: float = setting(2.0, flag=NO_AUGMENT, run_setting=True)
    rotation_degrees: float = setting(10.0, flag=NO_AUGMENT, run_setting=True)
    zoom: float = setting(0.1, flag=NO_AUGMENT, run_setting=True)
    # Batch size of validation and testing (and of --target-accuracy's check): no
    # gradients are kept, so larger batches than training's fit in memory.
    eval_batch_size: int = setting(1000, "batch size of validation and testing", type=positive_int)
    # The name in RECIPES whose values this config took (train.py --recipe; flags given
    # explicitly win over its values); recorded in run.json and the resume checkpoint.
    # Set it with with_recipe(), which applies the values, never alone.
    recipe: str = setting("default", "a named set of settings over these defaults (RECIPES in model/config.py): "
                                     + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults'}"
                                                 for name, values in RECIPES.items())
                                     + "; flags given explicitly win over its values; --resume takes the checkpoint's",
                          run_setting=True, choices=tuple(RECIPES))
    # Lightning-style quick-check knobs.
    limit_train_batches: int | None = setting(None, "train on at most N batches per epoch", run_setting=True,
                                              type=positive_int, metavar="N", default_text="every batch")
    dry_run: bool = setting(False, f"quick check: one epoch of at most {DRY_RUN_BATCHES} batches")
    # "keras": Keras' built-in train_step; "native": the backends/ step.
    step: str = setting("keras", "Keras' built-in train step or the backends/ native one", run_setting=True,
                        choices=STEPS)
    pooling: str = setting("fast", "max-pool layer: TiledMaxPooling2D, each backend's fastest exact kernel (fast), "
                                   "or keras.layers.MaxPooling2D (stock)", run_setting=True, choices=POOLINGS)
    data: str | None = setting(None, "mnist.npz or a folder of IDX files", metavar="PATH",
                               default_text="$MNIST_PATH, else the cache, else a download")
    output_dir: str = setting("runs/latest", "where model.keras, run.json, curves.png go")
    resume: bool = setting(False, "continue the run in OUTPUT_DIR from checkpoints/last.keras, with its settings")
    overwrite: bool = setting(False, "replace the previous run in OUTPUT_DIR (without it, a new run there is refused)")
    # Whether steps are compiled (XLA for JAX/TF); None lets each backend use its fastest.
    jit_compile: bool | None = setting(None)
    target_accuracy: float | None = setting(
        None, "stop after the first epoch whose test accuracy is at least A, e.g. 0.99", type=accuracy_fraction,
        metavar="A", default_text="train every epoch")
    # Data-parallel training (model/devices.py). batch_size is the global batch, split
    # evenly over devices * num_nodes replicas.
    accelerator: str = setting("auto", "auto: GPUs when the framework sees any, else CPU", choices=ACCELERATORS,
                               group=DEVICES_GROUP)
    devices: int = setting(1, "devices per machine (on CPU, N simulated devices sharing the cores)", type=positive_int,
                           metavar="N", group=DEVICES_GROUP)
    num_nodes: int = setting(1, "machines (jax and torch); run this command once on each", type=positive_int,
                             metavar="M", group=DEVICES_GROUP)
    node_rank: int = setting(0, "this machine's rank, 0..M-1", type=int, metavar="R", group=DEVICES_GROUP)
    coordinator: str | None = setting(None, "address of the machine with --node-rank 0 (needed with --num-nodes > 1)",
                                      metavar="HOST:PORT", group=DEVICES_GROUP, default_text="none")
    collective_timeout_s: float = setting(300.0, "stop when a collective waits longer (a worker died or hangs)",
                                          flag="--collective-timeout", type=positive_float, metavar="SECONDS",
                                          group=DEVICES_GROUP)

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
            limit = self.limit_train_batches or DRY_RUN_BATCHES
            return self.replace(epochs=1, limit_train_batches=min(limit, DRY_RUN_BATCHES))
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


# The settings that define a run's maths, each with the flag that sets it (None: none
# does): stored in the resume checkpoint, and refused on --resume when a flag asks for
# another value.
RUN_SETTINGS = {field.name: flag_of(field) for field in dataclasses.fields(TrainConfig) if field.metadata.get("run_setting")}
# The augmentation settings --no-augment sets to 0 together.
AUGMENTATION_SETTINGS = tuple(name for name, flag in RUN_SETTINGS.items() if flag == NO_AUGMENT)
# Run settings added after checkpoints were first written, with the value every run before
# them had: a checkpoint that lacks one trained with that value.
RUN_SETTINGS_ADDED = {"warmup_epochs": 0.0, "label_smoothing": 0.0, "recipe": "default", "adam_beta_1": 0.9,
                      "adam_beta_2": 0.999}


def recorded_run_settings(recorded: dict) -> dict:
    """The run settings less the seed that a results file recorded (a TrainConfig's
    to_dict(), maybe from an older version): the maths two runs must share to be pooled.
    A setting the file lacks was added after it was written: it ran RUN_SETTINGS_ADDED's
    value (so a file from before recipes ran the default); any other is None (unknown)."""
    recorded = {**RUN_SETTINGS_ADDED, **recorded}
    return {name: recorded.get(name) for name in RUN_SETTINGS if name != "seed"}


def settings_label(name: str, settings: dict, versions: list[dict]) -> str:
    """A recipe's name, with the settings that tell `settings` apart from the other
    `versions` of that name (results files written while its values changed), e.g.
    "fast (batch_size=128, lr=0.01)"; the bare name when there is one version."""
    differing = [field for field in settings if any(other.get(field) != settings[field] for other in versions)]
    return f"{name} ({', '.join(f'{field}={settings[field]}' for field in differing)})" if differing else name

# The model predict.py and export.py use unless told otherwise: what train.py writes by default.
DEFAULT_MODEL = f"{TrainConfig.output_dir}/model.keras"
