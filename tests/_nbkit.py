"""Notebook helpers for the tests: papermill-style parameters, execution with nbclient, output reading.

papermill is not a dependency, so its parameter convention is reimplemented here: a notebook has one
code cell tagged ``parameters`` holding the defaults, and a run inserts a cell tagged
``injected-parameters`` right after it that assigns the overrides (later assignments win).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import nbformat

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"  # papermill's tag for the inserted cell


def read(path: str | Path):
    """The notebook at ``path`` as nbformat v4."""
    return nbformat.read(str(path), as_version=4)


def parameters_index(nb) -> int:
    """Index of the one code cell tagged ``parameters``; ValueError when there is none or several."""
    found = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"expected one code cell tagged {PARAMETERS_TAG!r}, found {len(found)}")
    return found[0]


def parameter_names(nb) -> list[str]:
    """Names assigned in the parameters cell, in order."""
    tree = ast.parse(nb.cells[parameters_index(nb)].source)
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    names.append(leaf.id)
    return names


def inject(nb, params: dict):
    """A copy of ``nb`` with a cell assigning ``params`` inserted after its parameters cell.

    Values are written with ``repr``, so they must be literals (str, int, float, bool, None, and
    lists/dicts of them). A name the parameters cell does not assign is a ValueError: it would be
    a typo that silently leaves the default in place.
    """
    index = parameters_index(nb)
    unknown = sorted(set(params) - set(parameter_names(nb)))
    if unknown:
        raise ValueError(f"{unknown} are not assigned in the parameters cell")
    for name, value in params.items():
        if ast.literal_eval(repr(value)) != value:
            raise ValueError(f"parameter {name}={value!r} is not a Python literal")
    out = copy.deepcopy(nb)
    lines = ["# Parameters"] + [f"{name} = {value!r}" for name, value in params.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    out.cells.insert(index + 1, cell)
    return out


def execute(nb, *, cwd: str | Path, env: dict[str, str], timeout: int = 300):
    """Run every cell of ``nb`` in a fresh python3 kernel started in ``cwd`` with environment ``env``.

    Raises nbclient's CellExecutionError at the first failing cell; returns the executed notebook.
    """
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=env)


def output_texts(nb) -> str:
    """Every text output of ``nb`` (streams, plain text, HTML, Markdown, errors) joined by newlines."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type == "error":
                parts.append("\n".join(out.traceback))
            else:
                data = out.get("data", {})
                parts += [data[k] for k in ("text/plain", "text/html", "text/markdown") if k in data]
    return "\n".join(parts)


def image_count(nb) -> int:
    """Number of PNG images among the outputs of ``nb``."""
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))

