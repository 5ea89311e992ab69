"""Time the MNIST CNN per backend, device and path: training steps (Keras vs hand-written),
time to a target accuracy, and inference; write a results JSON, a Markdown report and a chart.

    python benchmarks/compare.py                      # full: 5 rounds of every cell
    python benchmarks/compare.py --quick              # every cell once, short windows (under 3 minutes)
    python benchmarks/compare.py --rounds 3 --backends jax,torch --devices cpu
    python benchmarks/compare.py --kinds training --paths keras-fit --device-counts 1,2   # data parallel
    python benchmarks/compare.py --kinds time-to-accuracy --recipes fast   # one recipe's time to 99%
    python benchmarks/compare.py --report a.json b.json   # report from saved results, rounds merged

Every round runs each cell once, in a fresh process, in a new random order (--order-seed);
the work lives in benchmarks/suite.py, rounds.py and report.py, this file only parses flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from benchmarks.cells import Cell, build_matrix, predict_cells, time_to_accuracy_cells  # noqa: E402
from benchmarks.measure import DATA_PARALLEL_PATH, DEVICES, PATHS, PREDICT, TIME_TO_ACCURACY  # noqa: E402
from benchmarks.report import ResultsFileError, load_runs, write_report  # noqa: E402
from benchmarks.suite import MODES, run_suite  # noqa: E402
from model.arguments import accuracy_fraction, comma_list, positive_float, positive_int  # noqa: E402
from model.config import BACKENDS, RECIPES  # noqa: E402
from model.devices import nearest_multiples  # noqa: E402
from model.runtime import UsageError  # noqa: E402


KINDS = ("training", TIME_TO_ACCURACY, PREDICT)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true",
                        help=f"a check that every cell works, not a measurement: every cell once, "
                             f"{MODES['quick']['window_steps']}-step windows, a light floor, time to "
                             f"{MODES['quick']['target_accuracy']} on {MODES['quick']['limit_train_batches']} "
                             "batches per epoch (default: off)")
    parser.add_argument("--rounds", type=positive_int, default=None, metavar="R",
                        help=f"rounds of every training and predict cell (default: {MODES['full']['rounds']}; "
                             f"with --quick, R rounds of 1-device keras-fit and its baseline, the other cells once); "
                             f"time-to-accuracy cells: --time-to-accuracy-rounds")
    parser.add_argument("--time-to-accuracy-rounds", type=positive_int, default=None, metavar="R",
                        help=f"rounds of every time-to-accuracy cell, each a whole training run "
                             f"(default: {MODES['full']['time_to_accuracy_rounds']})")
    parser.add_argument("--order-seed", type=int, default=None, metavar="N",
                        help="seed of the cells' order in each round (default: a random one, recorded)")
    parser.add_argument("--target-accuracy", type=accuracy_fraction, default=None, metavar="A",
                        help=f"test accuracy the time-to-accuracy cells train to (default: {MODES['full']['target_accuracy']}, "
                             f"{MODES['quick']['target_accuracy']} with --quick)")
    parser.add_argument("--kinds", type=comma_list(choices=KINDS), default=list(KINDS), metavar="NAME[,NAME...]",
                        help=f"cell kinds (default: {','.join(KINDS)})")
    parser.add_argument("--recipes", type=comma_list(choices=RECIPES), default=None, metavar="NAME[,NAME...]",
                        help=f"train.py recipes (model/config.py RECIPES) the time-to-accuracy cells train, one cell "
                             f"per backend and recipe (default: {','.join(MODES['full']['time_to_accuracy_recipes'])}, "
                             f"{','.join(MODES['quick']['time_to_accuracy_recipes'])} with --quick)")
    parser.add_argument("--batch-sizes", type=comma_list(int, positive=True), default=[128], metavar="N[,N...]",
                        help="training batch sizes to sweep (default: 128; time-to-accuracy cells train at their "
                             "recipe's)")
    parser.add_argument("--backends", type=comma_list(choices=BACKENDS), default=list(BACKENDS), metavar="NAME[,NAME...]",
                        help=f"backends to time (default: {','.join(BACKENDS)})")
    parser.add_argument("--devices", type=comma_list(choices=DEVICES), default=list(DEVICES), metavar="NAME[,NAME...]",
                        help=f"devices; a GPU cell with no GPU is reported skipped (default: {','.join(DEVICES)})")
    parser.add_argument("--paths", type=comma_list(choices=PATHS), default=list(PATHS), metavar="NAME[,NAME...]",
                        help=f"training paths (default: {','.join(PATHS)})")
    parser.add_argument("--device-counts", type=comma_list(int, positive=True), default=[1], metavar="N[,N...]",
                        help="devices per training cell: every path on 1, keras-fit data-parallel on each N > 1 "
                             "(train.py --devices N; on CPU N simulated devices share the cores) (default: 1)")
    parser.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                        help=f"per-cell time limit (default: {MODES['full']['timeout_s']} s, "
                             f"{MODES['quick']['timeout_s']} s with --quick; time-to-accuracy cells "
                             f"{MODES['full']['time_to_accuracy_timeout_s']} s)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the results go (default: benchmarks/results/<machine>/)")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="rebuild table and chart from results JSON files (several: their cells merged); "
                             "written beside the first file, or to --output-dir (default: run the benchmark)")
    args = parser.parse_args(argv)
    if 1 not in args.device_counts and DATA_PARALLEL_PATH not in args.paths and "training" in args.kinds:
        parser.error(f"--device-counts {','.join(map(str, args.device_counts))} with --paths {','.join(args.paths)} "
                     f"leaves no training cell: more than one device runs {DATA_PARALLEL_PATH} only; add it to --paths "
                     "or 1 to --device-counts")
    if args.time_to_accuracy_rounds and TIME_TO_ACCURACY not in args.kinds:
        parser.error(f"--time-to-accuracy-rounds {args.time_to_accuracy_rounds} repeats the time-to-accuracy cells, "
                     f"and --kinds {','.join(args.kinds)} runs none; add {TIME_TO_ACCURACY} to --kinds or leave it out")
    if args.recipes and TIME_TO_ACCURACY not in args.kinds:
        parser.error(f"--recipes {','.join(args.recipes)} names what the time-to-accuracy cells train, and --kinds "
                     f"{','.join(args.kinds)} runs none; add {TIME_TO_ACCURACY} to --kinds or leave --recipes out")
    for count in args.device_counts:
        for batch_size in args.batch_sizes:
            if batch_size % count:
                sizes = " or ".join(map(str, nearest_multiples(batch_size, count)))
                parser.error(f"--device-counts {count}: batch size {batch_size} does not split evenly over {count} "
                             f"devices; use a device count that divides it, or --batch-sizes {sizes}")
    return args


def report(paths: list[str], output_dir: str | None) -> int:
    try:
        runs = load_runs(paths)
    except ResultsFileError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    first = Path(paths[0])
    stem = first.stem if len(runs) == 1 else f"merged-{first.stem}-and-{len(runs) - 1}-more"
    folder = Path(output_dir) if output_dir else first.parent
    try:
        table, markdown, chart = write_report(runs, folder / stem)
    except OSError as error:
        print(f"compare.py: error: cannot write the report to {str(folder)!r} ({error.strerror or error}); "
              "choose another folder with --output-dir", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {markdown} and {chart}", file=sys.stderr)
    return 0


def benchmark_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells the flags ask for: training, then time to accuracy (one per backend and
    recipe; --recipes, else the mode's), then predict."""
    cells = (build_matrix(args.backends, args.devices, args.paths, args.batch_sizes, args.device_counts)
             if "training" in args.kinds else [])
    if TIME_TO_ACCURACY in args.kinds:
        recipes = args.recipes or MODES["quick" if args.quick else "full"]["time_to_accuracy_recipes"]
        cells += time_to_accuracy_cells(args.backends, args.devices, recipes)
    if PREDICT in args.kinds:
        cells += predict_cells(args.backends, args.devices)
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.output_dir)
    cells = benchmark_cells(args)
    mode = "quick" if args.quick else "full"
    try:
        _, table = run_suite(cells, mode, args.output_dir, rounds=args.rounds, order_seed=args.order_seed,
                             target_accuracy=args.target_accuracy, timeout_s=args.timeout,
                             time_to_accuracy_rounds=args.time_to_accuracy_rounds)
    except UsageError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; no results written", file=sys.stderr)
        return 130
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
