"""Write figures/bases.tex: the learning curves of the default study's shipped bases, read from their zoo.json.

    python paper/bases_table.py figures/bases.tex
"""

import json
import sys
from pathlib import Path

from ablate import zoo

rows = []
for name in ("llama-2l", "llama-4l"):
    folder = zoo.shipped(zoo.ZOO[name])
    if folder is None:
        sys.exit(f"no shipped build of {name} for its current spec")
    info = json.loads((folder / "zoo.json").read_text())
    for point in info["curve"]:
        acc = " / ".join(f"{point[f'synth_k{k}']:.2f}" for k in (1, 2, 3, 4))
        rows.append(f"{name} & {point['tokens'] / 2**20:g}M & {point['tokens_per_param']:.1f} & "
                    f"{point['val_loss']:.4f} & {acc} \\\\")
table = "\n".join([
    "% written by paper/bases_table.py from the shipped bases' zoo.json",
    "\\begin{tabular}{lrrrl}", "\\toprule",
    "base & tokens & tokens/param & held-out loss & accuracy $k$ = 1 / 2 / 3 / 4 \\\\", "\\midrule",
    *rows, "\\bottomrule", "\\end{tabular}", ""])
Path(sys.argv[1]).write_text(table)
print(f"wrote {sys.argv[1]}")
