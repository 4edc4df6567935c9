"""Layer redundancy: angular distances between each decoder layer's input and output.

Checks that a layer made an exact identity (attention o_proj and MLP down_proj zeroed, so
the residual stream passes unchanged) measures exactly 0 while random layers measure
more, in every test family; that the values match arccos(cos)/pi computed from
transformers' own ``output_hidden_states`` for every layer but the last (whose entry there
comes after the final norm); the DUS duplicated/dropped layer sets; and that
``study_redundancy`` caches per base and recomputes only when the key changes. The measurements of
plans that choose layers (issue 16): ``prune(k, by=angular)`` picks the block a direct implementation
of Gromov et al.'s formula on transformers' hidden states picks, ``by=influence`` is ShortGPT's block
influence, and ``similar(m)`` duplicates the layers nearest the identity.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_model

from ablate.errors import UserError
from ablate.plan import prune, similar
from ablate.redundancy import CACHE_NAME, angular_distances, dus_layers, measure, study_redundancy

ROWS = np.random.default_rng(0).integers(0, 96, size=(3, 10))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_layer_measures_zero(family):
    model = tiny_model(family, 4)
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    d = angular_distances(model, ROWS, batch_size=2)
    assert d.shape == (4,)
    assert d[2] == 0.0
    assert np.all(d[[0, 1, 3]] > 1e-3) and np.all(d <= 1.0)


def test_matches_output_hidden_states_reference():
    model = tiny_model("llama", 4, seed=1)
    with torch.no_grad():  # a final norm that turns the stream (unit weights would only rescale it)
        model.model.norm.weight.uniform_(0.2, 3.0)
    d = angular_distances(model, ROWS, batch_size=3)
    with torch.no_grad():
        hs = model(input_ids=torch.as_tensor(ROWS), output_hidden_states=True).hidden_states
    for layer in range(3):  # hidden_states[4] is after the final norm, not layer 3's output
        a, b = hs[layer].double(), hs[layer + 1].double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
        assert d[layer] == pytest.approx(float(torch.arccos(cos).mean() / torch.pi), abs=1e-6)
    final = hs[4].double()
    cos_last = torch.nn.functional.cosine_similarity(hs[3].double(), final, dim=-1).clamp(-1, 1)
    assert abs(d[3] - float(torch.arccos(cos_last).mean() / torch.pi)) > 1e-4  # the normed entry differs


def test_dus_layers():
    assert dus_layers(4, 1) == ([1, 2], [])
    assert dus_layers(32, 8) == (list(range(8, 24)), [])
    assert dus_layers(4, 2) == ([], [])
    assert dus_layers(4, 3) == ([], [1, 2])


def test_bad_rows_are_a_user_error():
    with pytest.raises(UserError, match="rows"):
        angular_distances(tiny_model("llama", 2), np.zeros((0, 5), dtype=np.int64))


def test_study_redundancy_caches_per_base(tmp_path):
    config = {"bases": [{"model": "a", "label": "A"}, {"model": "b", "label": None}],
              "data": {"source": {"kind": "synthetic"}, "seq_len": 10, "val_tokens": 30, "seed": 0},
              "train": {"tokens": 100}}
    calls = []

    def load(spec):
        calls.append(spec)
        return tiny_model("llama", 2 if spec == "a" else 3), ROWS

    first = study_redundancy(config, tmp_path, rows=2, load=load)
    assert calls == ["a", "b"] and list(first) == ["A", "b"] and len(first["b"]) == 3
    assert study_redundancy(config, tmp_path, rows=2, load=load) == first and calls == ["a", "b"]
    config["bases"][1]["model"] = "b"  # unchanged key: still cached
    config["data"]["seed"] = 1  # another held-out set: both recomputed
    study_redundancy(config, tmp_path, rows=2, load=load)
    assert calls == ["a", "b", "a", "b"]
    cached = json.loads((tmp_path / CACHE_NAME).read_text())
    assert cached["bases"]["A"]["key"]["rows"] == 2


def test_study_redundancy_loads_a_local_checkpoint_and_the_study_data(tmp_path, tiny_tokenizer, monkeypatch):
    """The default path: ablate.base.load on a checkpoint folder, ablate.data.load_packed on a text file."""
    from ablate.config import parse_config

    monkeypatch.setenv("ABLATE_HOME", str(tmp_path / "home"))  # the packed-data cache stays in the test
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"the cat {i} sat on the mat . a = {i} . b = a . b ?" for i in range(300)))
    config = parse_config({"name": "r", "bases": [{"model": str(tmp_path / "ckpt"), "label": "ck"}],
                           "data": {"source": str(text), "seq_len": 16, "val_tokens": 256},
                           "train": {"tokens": 2048}}).model_dump(mode="json")
    out = study_redundancy(config, tmp_path, rows=8, device="cpu")
    assert list(out) == ["ck"] and len(out["ck"]) == 3 and all(0 < d < 1 for d in out["ck"])


def _hidden_states_without_final_norm(model, rows):
    """x^0 .. x^n straight from transformers: output_hidden_states with the final norm made the identity,
    so the last entry is the last layer's output (the reference Gromov et al.'s formula reads)."""
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():
            return [h.double() for h in model(input_ids=torch.as_tensor(rows), output_hidden_states=True).hidden_states]
    finally:
        model.model.norm = norm


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_by_angular_picks_what_gromov_et_al_s_formula_picks(family):
    """d(x^l, x^(l+k)) = arccos(x_T^l . x_T^(l+k) / |x_T^l| |x_T^(l+k)|) / pi at the final token T, averaged over
    rows; the block l* .. l*+k-1 of least distance goes. Implemented here directly on transformers' hidden states."""
    n = 6
    model = tiny_model(family, n, seed=3)
    rows = np.random.default_rng(1).integers(0, 96, size=(5, 12))
    hs = _hidden_states_without_final_norm(model, rows)
    measured = measure(model, rows, [("gromov", k) for k in range(1, n)], batch_size=2)
    for k in range(1, n):
        direct = []
        for layer in range(n - k + 1):
            a, b = hs[layer][:, -1], hs[layer + k][:, -1]
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            direct.append(float((torch.arccos(cos) / torch.pi).mean()))
        assert measured[("gromov", k)] == pytest.approx(direct, abs=1e-6)
        start = int(np.argmin(direct))
        plan = prune(k, "angular").plan(n, measured)
        assert list(plan.sources) == [i for i in range(n) if not start <= i < start + k], k


def test_prune_by_influence_is_shortgpt_s_block_influence():
    n = 5
    model = tiny_model("llama", n, seed=4)
    rows = np.random.default_rng(2).integers(0, 96, size=(3, 9))
    hs = _hidden_states_without_final_norm(model, rows)
    got = measure(model, rows, [("influence", 1), ("angular", 1)], batch_size=2)
    bi = [float((1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean()) for i in range(n)]
    assert got[("influence", 1)] == pytest.approx(bi, abs=1e-9)
    assert got[("angular", 1)] == pytest.approx(angular_distances(model, rows, batch_size=2).tolist(), abs=0)
    keep = sorted(sorted(range(n), key=lambda i: bi[i])[2:])
    assert list(prune(2, "influence").plan(n, got).sources) == keep


def test_similar_duplicates_the_layers_nearest_the_identity():
    """Two consecutive identity layers (zero-output) at the top: similar(m) duplicates them, not SOLAR's middle."""
    n = 6
    model = tiny_model("llama", n, seed=5)
    with torch.no_grad():
        for i in (4, 5):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    op = similar(2)
    measured = measure(model, ROWS, op.needs(n))
    assert measured[("angular", 1)][4:] == [0.0, 0.0]
    assert op.plan(n, measured).sources == (0, 1, 2, 3, 4, 5, 4, 5)


def test_unknown_measurement_is_a_user_error():
    with pytest.raises(UserError, match="cannot measure"):
        measure(tiny_model("llama", 2), ROWS, [("gromov", 3)])
