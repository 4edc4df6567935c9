"""The notebooks: committed clean, and both run top to bottom on tiny inputs.

Checks that each notebook is valid nbformat v4 with no outputs and exactly one cell tagged
``parameters``; that papermill-style injection puts the overrides right after that cell and
rejects names it does not define; that analysis.ipynb draws every figure ``python -m
ablate.figures`` draws; that quickstart.ipynb runs on a micro zoo base (seconds), computing the
published SOLAR and Mixtral sizes on the meta device and an MoE upcycle equal to its base; and
that analysis.ipynb runs on a three-trial study made in this session, showing each figure and
caching the layer-redundancy numbers. Kernels run offline with ``ABLATE_HOME`` in a temp folder.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import nbformat
import pytest
from _nbkit import execute, image_count, inject, output_texts, parameter_names, read

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
QUICKSTART, ANALYSIS = NOTEBOOKS / "quickstart.ipynb", NOTEBOOKS / "analysis.ipynb"
STUDY = "nb-smoke"
# The study's YAML: a 4-layer micro base, the synthetic data and tasks, three trials (the controls
# every study queues first: m = n/2, the MoE upcycle, SOLAR's m = n/4) of 8 CPT steps each.
STUDY_YAML = """\
name: {name}
description: a three-trial study for the notebook tests
bases:
  - {{model: {base}, label: micro4}}
methods: {{dus: true, moe: {{experts: 2, top_k: 1}}}}
data: {{source: synthetic, seq_len: 64, val_tokens: 1024}}
train: {{tokens: 4096, tokens_per_step: 512, micro_batch_size: 8, lr: 1e-3, eval_every: 2, eval_rows: 8}}
eval: {{subset: 20}}
pruner: {{kind: none}}
"""


@contextlib.contextmanager
def _in_home(home: Path):
    """ABLATE_HOME=home and one torch thread for in-process builds, both restored afterwards.

    One thread: these models are tiny, and with two threads on a busy shared machine each step
    waits on thread synchronisation (measured 0.1-0.7 s per step against 0.02-0.03 s).
    """
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ABLATE_HOME", str(home))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _kernel_env(home: Path) -> dict[str, str]:
    return {**os.environ, "ABLATE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # one thread: see _in_home


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ablate-home")


@pytest.fixture(scope="session")
def micro_base(home) -> Path:
    """A 4-layer micro zoo model (pretrained for seconds), as a local checkpoint folder."""
    from ablate import zoo

    with _in_home(home):
        return zoo.build(zoo.micro_spec("micro4", num_layers=4), progress=False)


@pytest.fixture(scope="session")
def study_dir(home, micro_base, tmp_path_factory) -> Path:
    """A finished three-trial study, run once per session with the library call behind ``python -m ablate.study``."""
    from ablate.config import load_study_config
    from ablate.study import run_study
    from ablate.synthetic import write_eval_tasks

    out = tmp_path_factory.mktemp("runs")
    yaml_path = out / "study.yaml"
    yaml_path.write_text(STUDY_YAML.format(name=STUDY, base=micro_base))
    with _in_home(home):
        # Written here, where the study would write them: run_study writes the task YAMLs inside a
        # temporary sibling folder, so they name paths that no longer exist after its rename.
        write_eval_tasks(out / STUDY / "tasks")
        run_study(load_study_config(yaml_path), trials=3, out=out, progress=False)
    return out / STUDY


@pytest.mark.parametrize("path", [QUICKSTART, ANALYSIS], ids=lambda p: p.stem)
def test_committed_notebook_is_valid_and_clean(path):
    nb = read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs; clear them"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2  # prose explains the steps


def test_injection_follows_the_parameters_cell_and_rejects_unknown_names():
    nb = read(QUICKSTART)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert {"BASE", "M", "CPT_TOKENS"} <= set(parameter_names(nb))
    out = inject(nb, {"BASE": "/tmp/x", "M": 2})
    assert len(out.cells) == len(nb.cells) + 1 and len(nb.cells) == len(read(QUICKSTART).cells)
    assert out.cells[index + 1].source == "# Parameters\nBASE = '/tmp/x'\nM = 2"
    assert out.cells[index + 1].metadata["tags"] == ["injected-parameters"]
    with pytest.raises(ValueError, match="BASS"):
        inject(nb, {"BASS": "llama-4l"})


def test_analysis_draws_every_figure_of_the_figures_command():
    import ablate.figures
    from ablate import plots, studyplots

    figure_functions = {f"plots.{f}" for f in plots.__all__ if f not in ("arm_stats", "best_m", "human_count",
                                                                         "task_metrics", "save", "style")}
    figure_functions |= {f"studyplots.{f}" for f in studyplots.__all__}

    def calls(text: str) -> set[str]:
        return {m for m in re.findall(r"\b((?:plots|studyplots)\.\w+)\(", text) if m in figure_functions}

    source = "\n".join(c.source for c in read(ANALYSIS).cells if c.cell_type == "code")
    command = calls(Path(ablate.figures.__file__).read_text())
    assert len(command) >= 8
    assert command <= calls(source), f"missing from analysis.ipynb: {sorted(command - calls(source))}"


def test_quickstart_runs_on_a_micro_base(micro_base, home, tmp_path):
    params = {"BASE": str(micro_base), "M": 1, "EXPERTS": 2, "TOP_K": 1, "SEQ_LEN": 64, "CPT_TOKENS": 1024,
              "TOKENS_PER_STEP": 512, "VAL_TOKENS": 1024, "EVAL_ITEMS": 10}
    nb = execute(inject(read(QUICKSTART), params), cwd=tmp_path, env=_kernel_env(home))
    text = output_texts(nb)
    assert "n = 4 layers" in text
    assert "base layer of each variant layer: [0, 1, 2, 1, 2, 3]" in text  # DUS(4, 1), SOLAR's recipe
    for count in ("7,241,732,096", "10,731,524,096", "46,702,792,704", "12,879,925,248"):  # MISSION.md
        assert count in text
    moe_diff = float(re.search(r"MoE: .*initialisation = (\S+)", text).group(1))
    dus_diff = float(re.search(r"DUS: .*initialisation = (\S+)", text).group(1))
    assert moe_diff < 1e-5 < dus_diff  # the upcycle starts as the base; the DUS variant does not
    assert text.count("completed: 2 steps, 1,024 tokens") == 3  # control, DUS and MoE on one budget
    assert "synth_k4/acc" in text and image_count(nb) == 1  # evaluation table and the loss curves


def test_analysis_runs_on_a_finished_study(study_dir, home, tmp_path):
    assert (study_dir / "study.json").is_file() and not (study_dir / "redundancy.json").exists()
    nb = execute(inject(read(ANALYSIS), {"STUDY_DIR": str(study_dir)}), cwd=tmp_path, env=_kernel_env(home))
    text = output_texts(nb)
    assert f"Study `{STUDY}`" in text and "'complete': 3" in text
    assert "unchanged base" in text and "best m" in text  # the results table's notes
    # score vs m, loss vs m, vs parameters, vs FLOPs, loss curves, tasks, history, importances, timeline,
    # redundancy (one budget point: no budget figures)
    assert image_count(nb) == 10
    assert (study_dir / "redundancy.json").is_file()  # the redundancy pass ran and cached its numbers
