"""Checks of ablate.train: config validation, the exact token budget, the LR schedule,
bit-for-bit repeatability, divergence and early stopping, the MoE aux loss, agreement with a
plain torch.optim.AdamW loop written here, two-process DDP on CPU, and that
bench/gpu_check.py still runs at a tiny size."""

from __future__ import annotations

import copy
import itertools
import json
import runpy
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from conftest import tiny_model

from ablate.data import PackedData
from ablate.errors import UserError
from ablate.train import (
    StopTraining,
    TrainConfig,
    check_processes,
    continue_pretraining,
    early_eval_steps,
    lr_at,
    plan_budget,
)

REPO = Path(__file__).resolve().parents[1]
SEQ = 32


def random_data(train_rows: int = 256, val_rows: int = 16, vocab: int = 96, seed: int = 0):
    """Rows counting up from a random start with a random stride of 1-3: learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def rows(n):
        start, stride = rng.integers(0, vocab, (n, 1)), rng.integers(1, 4, (n, 1))
        return ((start + stride * np.arange(SEQ)) % vocab).astype(np.int32)

    return PackedData(train=rows(train_rows), val=rows(val_rows), seq_len=SEQ,
                      source="random counting rows")


def small_config(**overrides) -> TrainConfig:
    """4 steps of 16 rows (2 micro-batches of 8), evaluated every 2 steps."""
    kwargs = dict(tokens=4 * 16 * SEQ, micro_batch_size=8, tokens_per_step=16 * SEQ, lr=3e-3,
                  warmup=0.25, eval_every=2, eval_rows=8, precision="fp32")
    return TrainConfig(**{**kwargs, **overrides})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_rejects_nan_lr_and_unknown_keys():
    with pytest.raises(pydantic.ValidationError, match="lr"):
        TrainConfig(tokens=1000, lr=float("nan"))
    with pytest.raises(pydantic.ValidationError, match="lr"):
        TrainConfig(tokens=1000, lr=0.0)
    with pytest.raises(pydantic.ValidationError, match="betas"):
        TrainConfig(tokens=1000, betas=(0.9, 1.5))
    with pytest.raises(pydantic.ValidationError, match="learning_rate"):
        TrainConfig(tokens=1000, learning_rate=1e-3)


def test_budget_is_exact_and_bad_budgets_are_user_errors():
    config = TrainConfig(tokens=10_000, micro_batch_size=4, tokens_per_step=4 * 2 * SEQ)
    budget = plan_budget(config, seq_len=SEQ, num_train_rows=1000)
    assert budget.steps == 10_000 // 256 == 39
    assert budget.tokens == 39 * 256 and budget.accum_steps == 2 and budget.rows_per_step == 8
    assert plan_budget(config, seq_len=SEQ, num_train_rows=1000, num_processes=2).accum_steps == 1
    with pytest.raises(UserError, match="multiple of 384"):
        plan_budget(config, seq_len=SEQ, num_train_rows=1000, num_processes=3)
    with pytest.raises(UserError, match="smaller than one step"):
        plan_budget(config.model_copy(update={"tokens": 100}), seq_len=SEQ, num_train_rows=1000)
    with pytest.raises(UserError, match="needs 312 training rows"):
        plan_budget(config, seq_len=SEQ, num_train_rows=100)


def test_trained_tokens_match_the_budget(tmp_path):
    config = small_config(tokens=4 * 16 * SEQ + 100)  # the remainder below one step is dropped
    result = continue_pretraining(tiny_model(num_layers=2), random_data(), config,
                                  out_dir=tmp_path, progress=False)
    assert result.status == "completed"
    assert (result.steps, result.tokens, result.budget_tokens) == (4, 4 * 16 * SEQ, 4 * 16 * SEQ)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["tokens"] == result.tokens
    assert json.loads((tmp_path / "train_result.json").read_text())["tokens"] == result.tokens
    with pytest.raises(UserError, match="eval_rows=100 but data.val has 16 rows"):
        continue_pretraining(tiny_model(num_layers=2), random_data(), small_config(eval_rows=100))


def test_lr_schedule_warmup_midpoint_and_end():
    kw = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 111, **kw) == pytest.approx(0.1)
    assert lr_at(9, 111, **kw) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, 111, **kw) == pytest.approx(1.0)
    assert lr_at(60, 111, **kw) == pytest.approx(0.55)  # cosine midpoint: halfway to the floor
    assert lr_at(110, 111, **kw) == pytest.approx(0.1)  # last step at the floor
    values = [lr_at(s, 111, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(0, 1, lr=1.0, warmup_steps=0, min_lr_ratio=0.1) == 1.0  # one step: the peak


def seen_training_rows(model) -> list[tuple]:
    """Record every row the model is trained on (forward passes with gradients)."""
    seen: list[tuple] = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.extend(tuple(row) for row in kwargs["input_ids"].tolist())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_data_order_seed_reorders_the_budget_rows_and_nothing_else():
    from ablate.data import SHUFFLE_WINDOW as W

    data = random_data(train_rows=W + 32)
    config = small_config(tokens=W * SEQ)  # the budget is one whole shuffle window: 16 steps of 16 rows
    budget_rows = [tuple(r) for r in data.train[:W].tolist()]
    runs = {}
    for seed in (None, 1, 2):
        model = tiny_model(num_layers=2)
        runs[seed] = seen_training_rows(model)
        continue_pretraining(model, data, config.model_copy(update={"data_order_seed": seed}), progress=False)
    assert runs[None] == budget_rows  # default: the stored order
    for seed in (1, 2):  # the same rows, each once, in another order
        assert sorted(runs[seed]) == sorted(budget_rows) and runs[seed] != budget_rows
    assert runs[1] != runs[2]
    assert config.data_order_seed is None
    # a budget that ends inside a window takes distinct rows of that window, not only its own first rows
    model = tiny_model(num_layers=2)
    part = seen_training_rows(model)
    continue_pretraining(model, data, small_config(data_order_seed=1), progress=False)  # 64 rows
    assert len(part) == 64 and set(part) <= set(budget_rows) and sorted(part) != sorted(budget_rows[:64])
    assert part == runs[1][:64]  # prefix-stable: the first 64 rows of the whole window's order


def test_two_cpu_runs_give_bit_identical_weights():
    weights = []
    for _ in range(2):
        model = tiny_model(num_layers=2)
        continue_pretraining(model, random_data(), small_config(), progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], tiny_model(num_layers=2).lm_head.weight)


def test_the_logits_are_freed_before_backward():
    """Holding the model output through backward kept rows x seq x vocab logits alive for no use:
    143 MB of peak memory at vocab 32k, 8 x 128 tokens (measured). Each backward must find the
    micro-batch's logits already gone."""
    import weakref

    model, alive = tiny_model(), []
    logits: list[weakref.ref] = []
    model.register_forward_hook(lambda m, a, out: logits.append(weakref.ref(out.logits)) if m.training else None)
    model.lm_head.weight.register_post_accumulate_grad_hook(lambda p: alive.append(logits[-1]() is not None))
    continue_pretraining(model, random_data(), small_config(), progress=False)
    assert len(alive) == 8 and not any(alive)  # 4 steps x 2 micro-batches


@pytest.mark.slow  # a cold torch.compile: ~30 s here (~10 s from the on-disk cache)
def test_compiled_layers_train_like_eager_and_leave_the_model_eager(tmp_path):
    """train.compile: layers (accelerate's compile_regions) follows the eager run's losses to float
    rounding, in one compile for two depths, and leaves the model itself uncompiled for evaluation."""
    runs = {}
    for mode, layers in ((False, 2), ("layers", 2), ("layers", 3)):
        model = tiny_model(num_layers=layers)
        out = tmp_path / f"{mode}{layers}"
        result = continue_pretraining(model, random_data(), small_config(compile=mode), out_dir=out, progress=False)
        runs[mode, layers] = [r["train_loss"] for r in read_metrics(out) if "train_loss" in r]
        assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules())
        assert result.status == "completed"
    assert runs[False, 2] == pytest.approx(runs["layers", 2], rel=1e-4)
    assert runs["layers", 2] != runs["layers", 3]  # the second depth ran its own layers through the shared graph


@pytest.mark.parametrize("overrides, world, message", [
    ({"compile": "layers"}, 2, "train.compile: layers trains in one process, this run has 2"),
    ({"distributed": "fsdp", "eval_rows": 7}, 2, "set train.eval_rows to a multiple of 2"),
    ({"compile": "layers", "distributed": "fsdp", "eval_rows": 7}, 1, None),
])
def test_what_a_config_cannot_do_over_several_processes(overrides, world, message):
    if message is None:
        check_processes(small_config(**overrides), world)
    else:
        with pytest.raises(UserError, match=message):
            check_processes(small_config(**overrides), world)


def test_compiled_layers_refuse_several_processes(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(UserError, match="compile: layers trains in one process"):
        continue_pretraining(tiny_model(num_layers=2), random_data(), small_config(compile="layers"), progress=False)


def test_non_finite_loss_stops_with_status_diverged():
    model = tiny_model(num_layers=2)
    calls = []

    def poison(module, args, output):  # forward 1 is the initial eval, 2-5 steps 1-2, 6 step 3
        calls.append(1)
        return output * float("inf") if len(calls) == 6 else output

    handle = model.lm_head.register_forward_hook(poison)
    try:
        result = continue_pretraining(model, random_data(), small_config(eval_every=100, eval_early=0),
                                      progress=False)  # no early evaluation: it would be a forward pass too
    finally:
        handle.remove()
    assert result.status == "diverged" and "step 3" in result.reason
    assert result.steps == 2 and result.final_val_loss is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_eval_is_called_at_eval_steps_and_can_stop():
    seen = []
    result = continue_pretraining(tiny_model(num_layers=2), random_data(),
                                  small_config(tokens=5 * 16 * SEQ),
                                  on_eval=lambda *a: seen.append(a), progress=False)
    assert [(s, t) for s, t, _ in seen] == [(2, 2 * 16 * SEQ), (4, 4 * 16 * SEQ), (5, 5 * 16 * SEQ)]
    assert result.status == "completed" and result.final_val_loss == seen[-1][2]

    result = continue_pretraining(tiny_model(num_layers=2), random_data(), small_config(),
                                  on_eval=lambda step, *_: step >= 2, progress=False)
    assert (result.status, result.steps, result.tokens) == ("stopped", 2, 2 * 16 * SEQ)

    def raise_stop(*_):
        raise StopTraining

    result = continue_pretraining(tiny_model(num_layers=2), random_data(), small_config(),
                                  on_eval=raise_stop, progress=False)
    assert (result.status, result.steps) == ("stopped", 2)


def test_early_evaluations_are_logged_not_reported_and_change_nothing(tmp_path):
    """eval_early: held-out loss at steps 1, 2, 4 (8 is an eval_every step) in metrics.jsonl and val_losses;
    on_eval (the pruner) still sees the eval_every evaluations only, and training is bit for bit the same."""
    config = small_config(tokens=10 * 16 * SEQ, eval_every=8, eval_early=5)  # steps 1, 2, 4, 8, 16: 16 > 10
    assert early_eval_steps(config, 10) == [1, 2, 4]
    assert early_eval_steps(config.model_copy(update={"eval_early": 0}), 10) == []
    assert early_eval_steps(config.model_copy(update={"eval_every": 2}), 10) == [1]
    seen, weights = [], []
    model = tiny_model(num_layers=2)
    result = continue_pretraining(model, random_data(), config, on_eval=lambda *a: seen.append(a[:2]),
                                  out_dir=tmp_path, progress=False)
    weights.append(model.state_dict())
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 1, 2, 4, 8, 10]
    assert [s for s, _ in result.val_losses] == [0, 1, 2, 4, 8, 10]
    assert [s for s, _ in seen] == [8, 10]  # what the pruner is told: unchanged by eval_early
    model = tiny_model(num_layers=2)
    plain = continue_pretraining(model, random_data(), config.model_copy(update={"eval_early": 0}), progress=False)
    weights.append(model.state_dict())
    assert [s for s, _ in plain.val_losses] == [0, 8, 10]
    assert dict(plain.val_losses) == {s: v for s, v in result.val_losses if s in (0, 8, 10)}
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert TrainConfig(tokens=1000).eval_early == 5  # existing configs get a few early points
    with pytest.raises(pydantic.ValidationError, match="eval_early"):
        TrainConfig(tokens=1000, eval_early=-1)


def test_moe_loss_includes_the_load_balancing_aux_loss(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                           router_aux_loss_coef=0.5, max_position_embeddings=128)
    model = MixtralForCausalLM(config)
    reference = copy.deepcopy(model).train()
    data = random_data()
    continue_pretraining(model, data, small_config(tokens=16 * SEQ), out_dir=tmp_path,
                         progress=False)
    step1 = read_metrics(tmp_path)[1]

    # the first step's loss, recomputed here from logits and router logits of the initial model
    expected_lm, expected_aux = [], []
    with torch.no_grad():
        for i in range(2):
            ids = torch.from_numpy(data.train[8 * i:8 * i + 8].astype(np.int64))
            out = reference(input_ids=ids)
            expected_lm.append(torch.nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)))
            expected_aux.append(load_balancing_loss_func(out.router_logits, 4, 2))
    lm, aux = float(sum(expected_lm) / 2), float(sum(expected_aux) / 2)
    assert step1["aux_loss"] == pytest.approx(aux, rel=1e-4)
    assert step1["train_loss"] == pytest.approx(lm + 0.5 * aux, rel=1e-4)
    assert step1["lm_loss"] == pytest.approx(lm, rel=1e-4)


def reference_losses(model, data: PackedData, config: TrainConfig, steps: int) -> list[float]:
    """A plain fp32 loop: torch.optim.AdamW, the same schedule, clipping and decay groups."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=config.betas, foreach=False)
    total = config.tokens // config.tokens_per_step
    rows, micro = config.tokens_per_step // SEQ, config.micro_batch_size
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr=config.lr, warmup_steps=int(config.warmup * total),
                                min_lr_ratio=config.min_lr_ratio)
        step_loss = 0.0
        for k in range(rows // micro):
            start = step * rows + k * micro
            ids = torch.from_numpy(data.train[start:start + micro].astype(np.int64))
            loss = model(input_ids=ids, labels=ids).loss / (rows // micro)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses


@pytest.mark.parametrize(("precision", "rel"), [("fp32", 1e-5), ("bf16", 2e-2)])
def test_losses_match_a_plain_adamw_loop(tmp_path, precision, rel):
    data, config = random_data(), small_config(precision=precision, lr=1e-2)
    expected = reference_losses(tiny_model(num_layers=2), data, config, steps=4)
    result = continue_pretraining(tiny_model(num_layers=2), data, config, out_dir=tmp_path,
                                  progress=False)
    assert result.precision == precision
    got = [r["train_loss"] for r in read_metrics(tmp_path)[1:]]
    assert got == pytest.approx(expected, rel=rel)
    assert expected[-1] < expected[0] - 0.05  # the loop learns, so the comparison means something


DDP_SCRIPT = """
import os, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from test_train import random_data, small_config
from ablate.train import continue_pretraining
torch.set_num_threads(1)
model = tiny_model(num_layers=2)
result = continue_pretraining(model, random_data(), small_config(), progress=False)
assert result.num_processes == int(os.environ.get("WORLD_SIZE", 1)), result
torch.save(model.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ.get("RANK", "s")))
"""


@pytest.mark.slow  # two fresh interpreters importing torch: ~15-30 s on 2 shared cores
def test_two_process_ddp_on_cpu_matches_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(REPO / "tests"),
                                                        out=str(tmp_path))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), str(script)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=240, cwd=tmp_path)
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
    rank0, rank1, single = (torch.load(tmp_path / f"rank{r}.pt") for r in ("0", "1", "s"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    for k in rank0:  # same global batch: equal up to float summation order
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-4, atol=1e-5)


def test_gpu_check_runs_tiny_on_cpu(monkeypatch, capsys):
    pytest.importorskip("ablate.upscale")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny"])
    runpy.run_path(str(REPO / "bench" / "gpu_check.py"), run_name="__main__")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu_6n"] < 1
