"""``ablate plan-memory``: the parameter counts it plans with against the MISSION's reference numbers
(Mistral 7B, SOLAR 10.7B, Mixtral 8x7B from the published config), its arithmetic (16 bytes per parameter
sharded over G GPUs with fsdp), and the command on every shipped study."""

from pathlib import Path

import pytest

from ablate.config import load_study_config, parse_config
from ablate.memory import PUBLISHED, STATE_BYTES, base_config, main, plan_memory

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))


def solar_tree(m: list[int]) -> dict:
    return {"name": "solar-plan", "bases": [{"model": "mistralai/Mistral-7B-v0.1", "m": m}],
            "methods": {"dus": True, "moe": {"experts": 8, "top_k": 2}},
            "data": {"source": "synthetic", "seq_len": 4096}, "train": {"tokens": 4194304, "tokens_per_step": 4194304,
                                                                         "micro_batch_size": 1}}


def test_the_published_mistral_config_gives_the_mission_parameter_counts():
    assert base_config("mistralai/Mistral-7B-v0.1").num_hidden_layers == 32
    rows = plan_memory(parse_config(solar_tree([8])), gpus=8)
    dus, moe = rows
    assert (dus.arm, dus.layers, dus.params) == ("DUS m=8", 48, 10_731_524_096)  # SOLAR 10.7B
    assert (moe.layers, moe.params) == (32, 46_702_792_704)  # Mixtral 8x7B, total parameters
    assert dus.base_kept == 2 * 7_241_732_096  # the bf16 base on every GPU


def test_fsdp_shards_the_16_bytes_per_parameter_and_ddp_does_not():
    config = parse_config(solar_tree([0, 8]))
    one, eight = plan_memory(config, gpus=1), plan_memory(config, gpus=8)
    for a, b in zip(one, eight, strict=True):
        assert a.states_fsdp == STATE_BYTES * a.params and b.states_fsdp * 8 == pytest.approx(a.states_fsdp)
        assert a.states_ddp == b.states_ddp == 8 * a.params  # a bf16 checkpoint trains in bf16 under ddp
        assert a.activations == b.activations and b.fsdp_total < a.fsdp_total
    assert one[0].arm == "DUS m=0" and one[0].layers == 64  # the deepest arm of the m list


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_plan_memory_runs_on_every_shipped_study(path, capsys):
    config = load_study_config(path)
    hub = [b.model for b in config.bases if "/" in b.model and not Path(b.model).exists()]
    assert set(hub) <= set(PUBLISHED)  # a shipped study's hub bases can be planned offline
    with pytest.raises(SystemExit) as done:
        main([str(path), "--gpus", "8"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= len(config.bases) and "activations: an estimate" in out
