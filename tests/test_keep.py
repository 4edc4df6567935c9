"""Kept variants (``--keep``) on the tiny study: the best trial per base and operator is saved as an
ordinary Hugging Face checkpoint that loads with ``AutoModelForCausalLM`` and scores what its trial
recorded; its model card parses with ``huggingface_hub.ModelCard``; a deleted kept folder is filled
again and the summary says what was lost; ``--keep all`` with several budget points keeps every
trial at every point; a disk without room stops the study before a trial trains, with the size
needed; a save that fails leaves the kept folder as it was."""

import json
import math
import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from ablate import keep
from ablate.config import parse_config
from ablate.evaluate import perplexity
from ablate.results import read_records
from ablate.study import main, run_study
from ablate.trial import Workspace


def _best(records: dict, base: str, method: str, budget: int | None = None) -> int:
    """The trial with the lowest objective of (base, method) at ``budget`` (the last point when None)."""
    scores = {}
    for number, r in records.items():
        if r.get("base") == base and r.get("method") == method and r.get("budgets"):
            point = r["budgets"][-1] if budget is None else next(p for p in r["budgets"] if p["budget"] == budget)
            scores[number] = point["objective"]
    return min(scores, key=scores.get)


def test_keep_best_loads_scores_and_has_a_card(home, tmp_path, capsys):
    config = parse_config(home.tree(repeats=2))
    run_study(config, trials=4, out=tmp_path, progress=False)
    study_dir = tmp_path / "tiny-study"
    records = read_records(study_dir)
    kept = study_dir / "kept" / "best" / "tiny"
    assert sorted(p.name for p in kept.iterdir()) == ["dus", "moe"]  # no-CPT reference: nothing trained, not kept
    folder = kept / "dus"
    info = json.loads((folder / "keep.json").read_text())
    assert info["trial"] == _best(records, "tiny", "dus")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "mergekit.yaml"} <= {p.name for p in folder.iterdir()}
    assert (kept / "moe" / "mergekit-moe.yaml").is_file()

    # an ordinary checkpoint that scores, on the study's held-out rows, what its trial recorded
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    record = records[info["trial"]]
    assert model.config.num_hidden_layers == record["s"]
    data = Workspace(config, "cpu", None, progress=False).data(tokenizer)
    with torch.no_grad():
        loss = perplexity(model, data.val, batch_size=8)["val_loss"]
    assert loss == pytest.approx(record["metrics"]["val_loss"], abs=1e-5)

    # the model card: front matter Hugging Face reads, the recipe that rebuilds the untrained variant
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == str(home.base) and card.data.library_name == "transformers"
    assert {"ablate", "depth-up-scaling"} <= set(card.data.tags)
    recipe = (folder / "mergekit.yaml").read_text()
    assert recipe.strip() in card.text and yaml.safe_load(recipe)["merge_method"] == "passthrough"
    assert f"trial {info['trial']}" in card.text and "commit " in card.text
    out = capsys.readouterr().out
    assert "kept/best/tiny/dus" in out and " MB" in out

    # someone deletes the kept DUS folder; the study goes on: the next DUS trial fills it again
    keep._remove(folder)
    run_study(config, trials=9, out=tmp_path, progress=False)  # all 9: repeat 1 of the control and MoE too
    records = read_records(study_dir)
    info = json.loads((folder / "keep.json").read_text())
    assert info["trial"] >= 4 and AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    out = capsys.readouterr().out
    best = _best(records, "tiny", "dus")
    if best != info["trial"]:  # the best DUS trial was in the deleted folder: the summary says so
        assert f"trial {best} scored better but its kept folder was deleted" in " ".join(out.split())
    # with two repeats of MoE and of the control, MoE's card carries the paired interval against the control
    assert "over 2 pair(s)" in ModelCard.load(kept / "moe" / "README.md").text
    assert "95% interval [" in ModelCard.load(kept / "moe" / "README.md").text
    assert not [p for p in study_dir.joinpath("kept").rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def test_keep_all_at_every_budget_point(home, tmp_path):
    train = {**home.tree()["train"], "schedule": "wsd", "warmup_tokens": 0, "budgets": [256, 512]}
    config = parse_config({**home.tree(train=train), "keep": "all"})
    run_study(config, trials=3, out=tmp_path, progress=False)
    study_dir = tmp_path / "tiny-study"
    records = read_records(study_dir)
    trained = sorted(n for n, r in records.items() if r["method"] != "nocpt")
    names = sorted(p.parent.name for p in (study_dir / "kept" / "trials").glob("*/keep.json"))
    assert names == sorted(f"{n}@{b}" for n in trained for b in (256, 512))
    for n in trained:
        for point in records[n]["budgets"]:
            info = json.loads((study_dir / "kept" / "trials" / f"{n}@{point['budget']}" / "keep.json").read_text())
            assert info["objective"] == point["objective"] and info["cpt"]["tokens"] == point["tokens"]


def test_no_room_stops_before_training(home, tmp_path, monkeypatch, capsys):
    path = home.write(tmp_path / "configs")
    monkeypatch.setattr(keep, "free_bytes", lambda path: 10_000)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--trials", "3", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"no room for a kept checkpoint in .*: it needs [\d.]+ MB and .* has 0.0 MB free", lines[0])
    assert "--keep none" in lines[0]
    trials = tmp_path / "out" / "tiny-study" / "trials"
    # the no-CPT reference ran (nothing to keep); the first trained arm stopped before its first step
    assert [r["method"] for r in read_records(trials.parent).values()] == ["nocpt"]
    assert not list(trials.glob(".*")) and not (trials.parent / "kept").exists()
    # the same study continues with --keep none: the check is the kept checkpoint's only
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--trials", "2", "--out", str(tmp_path / "out"), "--quiet", "--keep", "none"])
    assert exit_info.value.code == 0 and len(read_records(trials.parent)) == 2
    assert "died" not in capsys.readouterr().out  # the stopped trial is not charged as a dead worker


def test_a_failed_save_leaves_the_kept_folder_as_it_was(tmp_path, tiny_tokenizer):
    from conftest import tiny_model

    model = tiny_model(vocab_size=len(tiny_tokenizer))
    folder = tmp_path / "kept" / "best" / "tiny" / "dus"
    keep.save_variant(model, tiny_tokenizer, folder, "---\nlibrary_name: transformers\n---\nfirst\n",
                      extra_files={keep.INFO: json.dumps({"trial": 1, "objective": 2.0})})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Broken:  # a tokenizer whose files cannot be written (a full disk, a kill) halfway through the save
        def save_pretrained(self, path):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        keep.save_variant(tiny_model(vocab_size=len(tiny_tokenizer), seed=1), Broken(), folder, "second")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == ["dus"]  # no temporary left beside it
    assert keep.better(1.0, 2.0, "minimize") and not keep.better(2.0, 2.0, "minimize")
    assert keep.better(3.0, 2.0, "maximize") and not keep.better(math.nan, 2.0, "minimize")


def test_a_kept_variant_whose_trial_failed_is_removed(kit, tmp_path, tiny_tokenizer, capsys):
    """A worker killed after it kept a variant leaves a failed trial: the refresh after the next trial
    removes its folder (the configuration runs again and keeps its own), never a stale "best"."""
    from types import SimpleNamespace

    from conftest import tiny_model
    from optuna.trial import TrialState

    from ablate.search import Arm

    keeper = keep.Keeper(tmp_path, parse_config(kit.tree()), "minimize")
    folder = keeper.folder(Arm("tiny", "dus", 1, 0), 3, 512)
    keep.save_variant(tiny_model(vocab_size=len(tiny_tokenizer)), tiny_tokenizer, folder, "card",
                      extra_files={keep.INFO: json.dumps({"trial": 3, "objective": 1.0})})
    assert keep.kept_folders(tmp_path) == [folder]
    study = SimpleNamespace(get_trials=lambda deepcopy=False, states=None: [SimpleNamespace(number=3,
                                                                                            state=TrialState.FAIL)])
    keeper.refresh(study)
    assert not folder.exists() and keep.kept_folders(tmp_path) == []
    assert not [p for p in folder.parent.iterdir() if p.name != ".locks"]  # no leftover beside it
    assert "trial 3 failed after it was kept; removed" in capsys.readouterr().out


@pytest.mark.slow
def test_two_workers_keep_the_best(kit, tmp_path):
    """Two workers on one journal storage offer their variants to the same kept folders at once: each
    folder ends with the best trial of its slot, complete, and no temporary beside it."""
    from _studykit import finish

    from ablate.check import check_study

    config = kit.write(tmp_path, repeats=2)  # 9 configurations
    args = ["--config", str(config), "--storage", f"journal:{tmp_path / 'shared.log'}", "--out", "runs",
            "--trials", "9", "--quiet"]
    workers = [kit.start(args, tmp_path) for _ in range(2)]
    for done in [finish(w, timeout=400) for w in workers]:
        assert done.returncode == 0, done.stderr
    study_dir = tmp_path / "runs" / "tiny-study"
    assert check_study(study_dir) == []
    records = read_records(study_dir)
    assert len(records) == 9
    for method in ("dus", "moe"):
        folder = study_dir / "kept" / "best" / "tiny" / method
        assert json.loads((folder / "keep.json").read_text())["trial"] == _best(records, "tiny", method)
        assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers >= 4
    assert not [p for p in (study_dir / "kept").rglob(".*") if p.name != ".locks" and p.parent.name != ".locks"]
