"""The training loop's memory and padding options, observed from inside a real run: gradient
checkpointing recomputes every transformer block in the backward pass (and changes no number), and
length grouping feeds the loop batches of similar-length pairs (and every pair once per epoch)."""

import contextlib
import inspect

import pytest
import torch
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Model

from harness import data as hdata
from harness import models as hmodels
from harness.train import train
from tests.precision import PRECISIONS, assert_close
from tests.runs import quick_config, read_metrics, without_perf

# ----------------------------------------------------------------------------- checkpointing


class BlockCalls:
    """Counts, over a whole run, the block computations done with autograd recording.

    The trunk (GPT2Model) runs once per forward and is never recomputed, so a block MLP entered
    while no trunk forward is in progress is entered in the backward pass: a recomputation.
    Counted on entry to the block's MLP (a forward pre-hook): transformers checkpoints a block's
    `forward`, not its `__call__`, so the block's own hooks do not fire again, and torch stops a
    recomputation once it has the tensors backward needs (inside the MLP), so post-forward hooks
    of the MLP do not fire in it either. Evaluation passes and the frozen reference run without
    grad and are not counted."""

    def __init__(self):
        self.trunk_depth = 0
        self.trunk_forwards = 0
        self.in_forward = 0
        self.recomputed: dict[int, int] = {}  # id(mlp) -> recomputations

    def pre(self, module, args):
        if not torch.is_grad_enabled():
            return
        if isinstance(module, GPT2Model):
            self.trunk_depth += 1
            self.trunk_forwards += 1
        elif isinstance(module, GPT2MLP):
            if self.trunk_depth:
                self.in_forward += 1
            else:
                self.recomputed[id(module)] = self.recomputed.get(id(module), 0) + 1

    def post(self, module, args, output):
        if isinstance(module, GPT2Model) and torch.is_grad_enabled():
            self.trunk_depth -= 1


@contextlib.contextmanager
def counting_block_calls():
    """BlockCalls of everything run inside the block (global module hooks, removed after)."""
    calls = BlockCalls()
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(calls.pre),
               torch.nn.modules.module.register_module_forward_hook(calls.post)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_checkpointing_recomputes_every_block_in_backward(seed_data, tmp_path, monkeypatch,
                                                                   precision):
    """train.gradient_checkpointing on: the loop hands the policy to
    harness.models.enable_checkpointing, and in every training micro-batch each of the policy's
    blocks runs once in the forward and once more in the backward. Off: no block runs in the
    backward. The metrics of both runs agree (no dropout: the recompute is the same computation;
    to 1e-5 in fp32, to bf16's rounding in bf16: tests/precision.py)."""
    given = []
    real = hmodels.enable_checkpointing

    def spy(model):
        given.append(model)
        real(model)

    monkeypatch.setattr(hmodels, "enable_checkpointing", spy)
    steps, n_layer = 3, hmodels.TINY_MODELS["tiny-xs"]["n_layer"]

    with counting_block_calls() as off:
        train(quick_config(seed_data, tmp_path, **{"train.max_steps": steps,
                                                   "train.precision": precision}),
              run_dir=tmp_path / "off")
    assert given == []
    assert off.trunk_forwards == steps  # one policy forward with grad per micro-batch
    assert off.in_forward == steps * n_layer
    assert off.recomputed == {}

    with counting_block_calls() as on:
        train(quick_config(seed_data, tmp_path, **{"train.max_steps": steps,
                                                   "train.precision": precision,
                                                   "train.gradient_checkpointing": True}),
              run_dir=tmp_path / "on")
    assert len(given) == 1 and all(b.gradient_checkpointing for b in given[0].base_model.h)
    policy_mlps = {id(m) for m in given[0].modules() if isinstance(m, GPT2MLP)}
    assert len(policy_mlps) == n_layer
    assert on.trunk_forwards == steps
    assert on.in_forward == steps * n_layer
    # Every block of the policy given to enable_checkpointing, once per micro-batch, in backward.
    assert on.recomputed == dict.fromkeys(policy_mlps, steps)

    a, b = without_perf(read_metrics(tmp_path / "off")), without_perf(read_metrics(tmp_path / "on"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert_close(x, y, list(x), precision, beta=0.1, pairs=4, rel=0, abs_=1e-5)


# ----------------------------------------------------------------------------- length grouping


def bound(fn, args, kwargs) -> dict:
    b = inspect.signature(fn).bind(*args, **kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def spy_on_data(monkeypatch):
    """Record every length_grouped call (its arguments and result) and the pair indices of every
    batch the loop draws from harness.data.batches for a split of `n` pairs."""
    grouped, drawn = [], []
    real_grouped, real_batches = hdata.length_grouped, hdata.batches

    def grouped_spy(*args, **kwargs):
        out = real_grouped(*args, **kwargs)
        grouped.append({**bound(real_grouped, args, kwargs), "out": list(out)})
        return out

    def batches_spy(*args, **kwargs):
        a = bound(real_batches, args, kwargs)
        record = {**a, "order": list(a["order"]), "drawn": []}
        drawn.append(record)
        for idx, batch in real_batches(*args, **kwargs):
            record["drawn"].append(idx.tolist())
            yield idx, batch

    monkeypatch.setattr(hdata, "length_grouped", grouped_spy)
    monkeypatch.setattr(hdata, "batches", batches_spy)
    return grouped, drawn


def mean_padded_width(order: list[int], items, batch_size: int) -> float:
    """Mean over the full batches of an order of the width the batch is padded to."""
    widths = [max(hdata.pair_length(items[i]) for i in order[s:s + batch_size])
              for s in range(0, len(order) - batch_size + 1, batch_size)]
    return sum(widths) / len(widths)


def train_orders(drawn: list[dict], n_train: int, batch_size: int) -> list[dict]:
    """The batches() calls over the train split (evaluation passes read other splits)."""
    return [d for d in drawn if len(d["items"]) == n_train and d["batch_size"] == batch_size]


def test_group_by_length_batches_similar_lengths(seed_data, tmp_path, monkeypatch):
    """train.group_by_length on, over two epochs: each epoch's order holds every train pair once;
    each batch the loop trains on is a run of consecutive pairs of one length-sorted chunk of that
    epoch's shuffled order (its lengths are the chunk's sorted lengths k·B .. k·B+B−1); the loop
    draws its batches in that order; and batches are narrower on average than without grouping."""
    B = 4
    grouped, drawn = spy_on_data(monkeypatch)
    # 120 records → 102 train pairs → 25 batches of 4 per epoch (drop_last): 27 steps span 2 epochs.
    fast = {"train.eval_every": 0, "train.eval_batches": 1, "train.test_at_end": False,
            "train.save_model": False}
    steps = 27
    s = train(quick_config(seed_data, tmp_path, **fast, **{"train.group_by_length": True,
                                                           "train.max_steps": steps}),
              run_dir=tmp_path / "grouped")
    n = s["data/train/kept"]
    assert len(grouped) >= 2, "two epochs, two groupings"
    orders = train_orders(drawn, n, B)
    assert [o["order"] for o in orders[:2]] == [g["out"] for g in grouped[:2]]
    assert grouped[0]["out"] != grouped[1]["out"]  # a new order every epoch
    consumed = 0
    for g, o in zip(grouped[:2], orders[:2], strict=True):
        items, size = g["items"], g["batch_size"] * g["chunk_batches"]
        assert g["batch_size"] == B and len(items) == n
        assert sorted(g["order"]) == list(range(n)), "the epoch's input order is a permutation"
        assert sorted(g["out"]) == list(range(n)), "every pair once per epoch"
        lengths = [hdata.pair_length(p) for p in items]
        chunk_of = {i: c for c in range(0, n, size) for i in g["order"][c:c + size]}
        for k in range(n // B):
            batch = g["out"][k * B:(k + 1) * B]
            chunks = {chunk_of[i] for i in batch}
            assert len(chunks) == 1, f"batch {k} mixes chunks"
            chunk = g["order"][chunks.pop():][:size]
            run = sorted(lengths[i] for i in chunk)
            mine = sorted(lengths[i] for i in batch)
            assert any(run[j:j + B] == mine for j in range(0, len(run) - B + 1, B)), (k, mine)
        # The loop trains on the batches of that order, in that order (drop_last: full ones only).
        expected = [g["out"][k * B:(k + 1) * B] for k in range(n // B)]
        assert o["drawn"] == expected[:len(o["drawn"])]
        consumed += len(o["drawn"])
    assert steps <= consumed <= steps + 1  # one micro-batch per step (a loop may draw one ahead)

    grouped_width = mean_padded_width(grouped[0]["out"], grouped[0]["items"], B)

    # The same run without grouping: no length_grouped call, and wider batches.
    grouped.clear()
    drawn.clear()
    plain = train(quick_config(seed_data, tmp_path, **fast, **{"train.max_steps": 1}),
                  run_dir=tmp_path / "plain")
    assert grouped == []
    plain_orders = train_orders(drawn, plain["data/train/kept"], B)
    assert sorted(plain_orders[0]["order"]) == list(range(n))
    plain_width = mean_padded_width(plain_orders[0]["order"], plain_orders[0]["items"], B)
    assert grouped_width < plain_width, (grouped_width, plain_width)
