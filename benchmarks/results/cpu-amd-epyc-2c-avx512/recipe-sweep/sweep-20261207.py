"""Scratch sweep of fast-recipe variants (JAX), seeds given; prints test accuracy per run."""
import sys, json, time
sys.path.insert(0, "/work/main")
from model.runtime import select_backend
select_backend(sys.argv[1])
import keras, numpy as np
from model.config import TrainConfig
from model.training import prepare_run
from model import module as module_lib

variants_wanted = sys.argv[2].split(",")
seeds = [int(s) for s in sys.argv[3].split(",")]
original = module_lib.CNNModule.configure_optimizers

def with_optimizer(factory):
    def configure(self):
        opt = original(self)
        return factory(opt.learning_rate if not hasattr(opt, "_learning_rate") else opt._learning_rate)
    return configure

VARIANTS = {
    "base": ({}, None),
    "b2_99": ({}, lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_2=0.99)),
    "b2_95": ({}, lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_2=0.95)),
    "nadam": ({}, lambda lr: keras.optimizers.Nadam(learning_rate=lr)),
    "adamw": ({}, lambda lr: keras.optimizers.AdamW(learning_rate=lr, weight_decay=0.05)),
    "lr15": ({"lr": 1.5e-2}, None),
    "lr15b2": ({"lr": 1.5e-2}, lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_2=0.99)),
    "wu05": ({"warmup_epochs": 0.5}, None),
    "b256": ({"batch_size": 256, "lr": 2e-2}, None),
    "b256b2": ({"batch_size": 256, "lr": 2e-2}, lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_2=0.99)),
    "ls0": ({"label_smoothing": 0.0}, None),
    "b256l15": ({"batch_size": 256, "lr": 1.5e-2}, None),
    "b192": ({"batch_size": 192, "lr": 1.5e-2}, None),
    "b1_8": ({}, lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_1=0.8, beta_2=0.99)),
}
for name in variants_wanted:
    changes, factory = VARIANTS[name]
    module_lib.CNNModule.configure_optimizers = with_optimizer(factory) if factory else original
    accs = []
    for seed in seeds:
        config = TrainConfig(seed=seed).with_recipe("fast").replace(**changes)
        keras.utils.clear_session()
        module, datamodule, trainer = prepare_run(config)
        trainer.verbose = 0
        t = time.perf_counter()
        trainer.fit(module, datamodule)
        p = module.network.predict(datamodule.x_test, batch_size=1000, verbose=0)
        acc = float(np.mean(np.argmax(p, -1) == datamodule.y_test))
        accs.append(acc)
        print(json.dumps({"variant": name, "seed": seed, "test_accuracy": acc, "fit_s": round(time.perf_counter() - t, 1)}), flush=True)
    print(f"## {name}: " + ", ".join(f"{a*100:.2f}" for a in accs) + f" mean {np.mean(accs)*100:.3f} min {min(accs)*100:.2f}", flush=True)
