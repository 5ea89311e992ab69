"""Rounds: every cell once per round, each in a fresh process, in a new random order.

Drift on a shared machine (minutes-long swings of 20% and more) would otherwise decide
which path looks faster. So, as asv does, a run repeats the whole matrix R times, and
within a round the training cells of one backend, device and batch size run as one
block in which keras-fit sits next to its framework baseline (keras-fit first in even
rounds, the baseline first in odd ones) and the other Keras paths around that pair, one
on each side, in random order, so one of them is next to the baseline too. keras-fit
on more than one device sits on keras-fit's other side: that 1-device cell is its
anchor. Blocks and the other cells (time-to-accuracy, predict) are shuffled. The order
comes from `order_seed` and the round number, and the results record it.
"""

from __future__ import annotations

import random
import sys

from benchmarks.cells import Cell, run_cell, summarize
from benchmarks.measure import KERAS_PATHS, PATHS

ANCHOR_PATH = "keras-fit"


def training_block(cells: list[Cell], round_index: int, rng: random.Random) -> list[Cell]:
    """One backend/device/batch size's training cells in this round's order."""
    keras_cells = [cell for cell in cells if cell.path in KERAS_PATHS and cell.device_count == 1]
    framework = [cell for cell in cells if cell.path == "framework"]
    data_parallel = [cell for cell in cells if cell.device_count > 1]
    rng.shuffle(keras_cells)
    rng.shuffle(data_parallel)  # draws nothing for fewer than 2 cells: 1-device orders stay as they were
    if not framework or not keras_cells:
        after = next((i + 1 for i, cell in enumerate(keras_cells) if cell.path == ANCHOR_PATH), len(keras_cells))
        return keras_cells[:after] + data_parallel + keras_cells[after:] + framework
    anchor = next((cell for cell in keras_cells if cell.path == ANCHOR_PATH), keras_cells[0])
    others = [cell for cell in keras_cells if cell != anchor]
    if round_index % 2 == 0:
        return others[:1] + data_parallel + [anchor, framework[0]] + others[1:]
    return others[:1] + [framework[0], anchor] + data_parallel + others[1:]


def round_order(cells: list[Cell], round_index: int, order_seed: int) -> list[Cell]:
    """The order of `cells` in round `round_index` (0-based): a function of the seed and
    the round only."""
    rng = random.Random(f"{order_seed}/{round_index}")
    blocks: dict[tuple, list[Cell]] = {}
    units = []
    for cell in cells:
        if cell.path in PATHS:
            key = (cell.backend, cell.device, cell.batch_size)
            if key not in blocks:
                blocks[key] = []
                units.append(blocks[key])
            blocks[key].append(cell)
        else:
            units.append([cell])
    units = [training_block(unit, round_index, rng) if unit[0].path in PATHS else unit for unit in units]
    rng.shuffle(units)
    return [cell for unit in units for cell in unit]


def _beside(order: list[Cell], index: int, path: str) -> bool:
    """Whether the cell at `index` has its block's 1-device `path` cell right before or after it."""
    cell = order[index]
    neighbours = order[max(index - 1, 0):index] + order[index + 1:index + 2]
    return any(other.path == path and other.device_count == 1 and (other.backend, other.device, other.batch_size)
               == (cell.backend, cell.device, cell.batch_size) for other in neighbours)


def adjacent_to_framework(order: list[Cell], index: int) -> bool:
    """Whether the cell at `index` has its own framework baseline right before or after it."""
    return _beside(order, index, "framework")


def adjacent_to_anchor(order: list[Cell], index: int) -> bool:
    """Whether a data-parallel cell has its 1-device keras-fit right before or after it."""
    return _beside(order, index, ANCHOR_PATH)


def run_rounds(cells: list[Cell], rounds_for, order_seed: int, spec_for, timeout_s, stream=None) -> dict[Cell, list[dict]]:
    """Run the rounds; cell -> its results, one per round it ran. `rounds_for(cell)` says
    how many rounds a cell runs, `spec_for(cell)` what it measures, `timeout_s(cell)` its
    limit. A cell skipped once (no GPU, framework missing) is not started again."""
    stream = stream or sys.stderr
    results: dict[Cell, list[dict]] = {cell: [] for cell in cells}
    skipped: set[Cell] = set()
    total_rounds = max((rounds_for(cell) for cell in cells), default=0)
    for round_index in range(total_rounds):
        due = [cell for cell in cells if cell not in skipped and rounds_for(cell) > round_index]
        order = round_order(due, round_index, order_seed)
        for position, cell in enumerate(order):
            head = f"[round {round_index + 1}/{total_rounds}, {position + 1}/{len(order)}] {cell.label} ..."
            stream.write(head)
            stream.flush()
            shown = []

            def show(line, shown=shown):
                stream.write(("\n" if not shown else "") + f"      {line}\n")
                stream.flush()
                shown.append(line)

            result = run_cell(cell, spec_for(cell), timeout_s(cell), show=show)
            result.update(round=round_index, position=position,
                          framework_adjacent=adjacent_to_framework(order, position)
                          if cell.path in KERAS_PATHS and cell.device_count == 1 else None)
            if cell.device_count > 1:
                result["anchor_adjacent"] = adjacent_to_anchor(order, position)
            stream.write(f"{head if shown else ''} {summarize(result)}\n")
            stream.flush()
            results[cell].append(result)
            if result["status"] == "skipped":
                skipped.add(cell)
    return results
