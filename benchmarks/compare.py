"""Time the MNIST CNN's training step per backend, device and path; write a results JSON,
a Markdown table and a chart.

    python benchmarks/compare.py                      # full matrix, batch 128 (21 min on a busy 2-core CPU)
    python benchmarks/compare.py --quick              # every cell on a few steps (2.5 min there)
    python benchmarks/compare.py --batch-sizes 128,512 --backends jax,torch --devices cpu
    python benchmarks/compare.py --report a.json b.json   # table and chart from saved results

Each cell runs in its own process (benchmarks/cells.py); the work lives in
benchmarks/suite.py and benchmarks/report.py, this file only parses flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cells import build_matrix  # noqa: E402
from benchmarks.measure import DEVICES, PATHS  # noqa: E402
from benchmarks.report import ResultsFileError, load_runs, write_report  # noqa: E402
from benchmarks.suite import MODES, run_suite  # noqa: E402
from model.arguments import comma_list, positive_float  # noqa: E402
from model.config import BACKENDS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true",
                        help=f"every cell on {MODES['quick']['limit_train_batches']} batches of one epoch instead of "
                             f"{MODES['full']['epochs']} full epochs (default: off)")
    parser.add_argument("--batch-sizes", type=comma_list(int, positive=True), default=[128], metavar="N[,N...]",
                        help="training batch sizes to sweep (default: 128)")
    parser.add_argument("--backends", type=comma_list(choices=BACKENDS), default=list(BACKENDS), metavar="NAME[,NAME...]",
                        help=f"backends to time (default: {','.join(BACKENDS)})")
    parser.add_argument("--devices", type=comma_list(choices=DEVICES), default=list(DEVICES), metavar="NAME[,NAME...]",
                        help=f"devices; a GPU cell with no GPU is reported skipped (default: {','.join(DEVICES)})")
    parser.add_argument("--paths", type=comma_list(choices=PATHS), default=list(PATHS), metavar="NAME[,NAME...]",
                        help=f"training paths (default: {','.join(PATHS)})")
    parser.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                        help=f"per-cell time limit (default: {MODES['full']['timeout_s']} s, "
                             f"{MODES['quick']['timeout_s']} s with --quick)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the results go (default: benchmarks/results/<machine>/)")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="rebuild table and chart from results JSON files (several: their cells merged); "
                             "written beside the first file, or to --output-dir (default: run the benchmark)")
    return parser.parse_args(argv)


def report(paths: list[str], output_dir: str | None) -> int:
    try:
        runs = load_runs(paths)
    except ResultsFileError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    first = Path(paths[0])
    stem = first.stem if len(runs) == 1 else f"merged-{first.stem}-and-{len(runs) - 1}-more"
    folder = Path(output_dir) if output_dir else first.parent
    table, markdown, chart = write_report(runs, folder / stem)
    print(table)
    print(f"wrote {markdown} and {chart}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.output_dir)
    cells = build_matrix(args.backends, args.devices, args.paths, args.batch_sizes)
    mode = "quick" if args.quick else "full"
    try:
        _, table = run_suite(cells, mode, args.timeout, args.output_dir)
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; no results written", file=sys.stderr)
        return 130
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
