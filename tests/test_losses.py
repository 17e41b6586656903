"""The loss registry worked by hand: robust, simpo, apo_zero, dpop, sft (Preferred-FT) and the RPO
NLL term, each loss's gradient direction, and the config rules that tie losses to reduction, label
smoothing and the NLL term."""

import math

import pytest
import torch

from harness import dpo
from harness.config import ConfigError, DPOConfig, load_config
from harness.step import StepSettings, dpo_batch


def logsig(z: float) -> float:
    """log σ(z) in plain floats."""
    return -math.log1p(math.exp(-z))


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# One pair, worked by hand: log π(y_w) = −1.2, log π(y_l) = −2.0, log π_ref(y_w) = −1.0,
# log π_ref(y_l) = −1.5. Chosen log-ratio −0.2, rejected −0.5, so h = 0.3. The policy made the
# chosen response less likely than the reference (by 0.2): DPO-Positive's penalty is on.
# The chosen response has 3 counted tokens: its per-token NLL is 1.2 / 3 = 0.4.
LOGPS = dict(pc=-1.2, pr=-2.0, rc=-1.0, rr=-1.5)
H, CHOSEN_RATIO, REJECTED_RATIO = 0.3, -0.2, -0.5
CHOSEN_TOKENS = torch.tensor([3])


def chosen_nll(pc: torch.Tensor) -> torch.Tensor:
    """The per-token NLL of the summed chosen log-prob `pc` over its 3 counted tokens."""
    return dpo.per_token_nll(pc, CHOSEN_TOKENS, "sum")


def run(loss: str, beta: float, pc: float = LOGPS["pc"], nll: bool = True, **kw) -> torch.Tensor:
    """The hand-worked pair's loss; the chosen NLL is passed (as the step does) unless nll=False."""
    t = {k: torch.tensor([v], dtype=torch.float64) for k, v in {**LOGPS, "pc": pc}.items()}
    if nll:
        kw.setdefault("chosen_nll", chosen_nll(t["pc"]))
    nll = kw.pop("chosen_nll", None)
    losses, _, _ = dpo.dpo_loss(t["pc"], t["pr"], t["rc"], t["rr"], DPOConfig(beta=beta, loss=loss, **kw),
                                chosen_nll=nll)
    return losses


def hand_value(loss: str) -> tuple[float, dict]:
    """(expected loss, dpo_loss keywords) from each paper's formula, in plain floats."""
    if loss == "sigmoid":  # −log σ(β·h), β = 0.5: −log σ(0.15) = 0.62096
        return -logsig(0.5 * H), dict(beta=0.5)
    # robust, ε = 0.2: (0.8 · 0.620957 − 0.2 · 0.770957) / 0.6 = 0.57096
    if loss == "robust":  # ((1−ε)(−log σ(βh)) − ε(−log σ(−βh))) / (1 − 2ε)
        eps, bh = 0.2, 0.5 * H
        return ((1 - eps) * -logsig(bh) - eps * -logsig(-bh)) / (1 - 2 * eps), dict(
            beta=0.5, label_smoothing=eps)
    if loss == "ipo":  # (h − 1/(2β))², β = 0.5: (0.3 − 1)² = 0.49
        return (H - 1.0) ** 2, dict(beta=0.5)
    if loss == "hinge":  # max(0, 1 − β·h), β = 0.5: 0.85
        return 1 - 0.5 * H, dict(beta=0.5)
    if loss == "simpo":  # −log σ(β(avg π_w − avg π_l) − γ), β = 2, γ = 0.5: −log σ(1.1) = 0.28733
        return -logsig(2.0 * (-1.2 - -2.0) - 0.5), dict(beta=2.0, simpo_gamma=0.5)
    if loss == "apo_zero":  # 1 − σ(β·(−0.2)) + σ(β·(−0.5)), β = 0.5: 1 − 0.47502 + 0.43782
        return 1 - sig(0.5 * CHOSEN_RATIO) + sig(0.5 * REJECTED_RATIO), dict(beta=0.5)
    if loss == "dpop":  # −log σ(β(h − λ·max(0, −1.0 + 1.2))), β = 0.5, λ = 5: −log σ(−0.35)
        return -logsig(0.5 * (H - 5.0 * 0.2)), dict(beta=0.5, dpop_lambda=5.0)
    if loss == "sft":  # Preferred-FT: −log π(y_w) / |y_w| = 1.2 / 3 = 0.4
        return 0.4, dict(beta=0.5)
    raise AssertionError(f"no hand-worked value for loss {loss!r}")


@pytest.mark.parametrize("loss", sorted(dpo.LOSSES))
def test_every_loss_by_hand(loss):
    """Each registered loss on the hand-worked pair equals its paper's formula in plain floats."""
    expected, kw = hand_value(loss)
    assert run(loss, **kw).item() == pytest.approx(expected, rel=1e-12)


def test_hand_values_are_the_worked_numbers():
    """The formulas above give the numbers written beside them (guards the helper itself)."""
    assert hand_value("robust")[0] == pytest.approx(0.57096, abs=1e-5)
    assert hand_value("simpo")[0] == pytest.approx(0.28733, abs=1e-5)
    assert hand_value("apo_zero")[0] == pytest.approx(1 - 0.47502 + 0.43782, abs=1e-5)
    assert hand_value("dpop")[0] == pytest.approx(math.log1p(math.exp(0.35)), abs=1e-12)


@pytest.mark.parametrize("loss", sorted(dpo.LOSSES))
def test_loss_falls_when_the_chosen_logp_rises(loss):
    """Raising log π(y_w) lowers every loss: the gradient w.r.t. it is negative, and a small step
    up lowers the value."""
    _, kw = hand_value(loss)
    pc = torch.tensor([LOGPS["pc"]], dtype=torch.float64, requires_grad=True)
    others = [torch.tensor([LOGPS[k]], dtype=torch.float64) for k in ("pr", "rc", "rr")]
    losses, _, _ = dpo.dpo_loss(pc, *others, DPOConfig(loss=loss, **kw), chosen_nll=chosen_nll(pc))
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    assert grad.item() < 0, loss
    assert run(loss, pc=LOGPS["pc"] + 0.01, **kw).item() < run(loss, **kw).item()


def test_robust_at_zero_flip_rate_is_dpo_and_refuses_half():
    """ε = 0 makes robust DPO the plain DPO loss; ε ≥ 1/2 (division by 1 − 2ε) is refused."""
    assert run("robust", 0.5).item() == pytest.approx(run("sigmoid", 0.5).item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        run("robust", 0.5, label_smoothing=0.5)


@pytest.mark.parametrize("loss", sorted(dpo.LOSSES))
def test_reference_free_flag_is_true_to_the_loss(loss):
    """A loss marked reference_free (simpo, sft) gives the same value under another reference;
    every other loss changes with it."""
    _, kw = hand_value(loss)
    pc, pr = torch.tensor([-1.2]), torch.tensor([-2.0])
    d, nll = DPOConfig(loss=loss, **kw), chosen_nll(pc)
    a, _, _ = dpo.dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.5]), d, chosen_nll=nll)
    b, _, _ = dpo.dpo_loss(pc, pr, torch.tensor([-0.5]), torch.tensor([-2.5]), d, chosen_nll=nll)
    assert (a.item() == b.item()) == dpo.LOSSES[loss].reference_free


def test_dpop_penalty_only_below_the_reference():
    """DPO-Positive equals DPO when log π(y_w) ≥ log π_ref(y_w)."""
    up = dict(pc=-0.9)  # above the reference's −1.0: no penalty
    assert run("dpop", 0.5, dpop_lambda=50.0, **up).item() == pytest.approx(
        run("sigmoid", 0.5, **up).item(), rel=1e-12)


def test_sft_weight_adds_the_chosen_per_token_nll():
    """RPO: loss + w·NLL per token. Summed log-prob −1.2 over 3 tokens → NLL 0.4 per token; with
    w = 0.5 the DPO loss −log σ(0.15) grows by 0.2."""
    nll = dpo.per_token_nll(torch.tensor([-1.2], dtype=torch.float64), torch.tensor([3]), "sum")
    assert nll.item() == pytest.approx(0.4)
    assert dpo.per_token_nll(torch.tensor([-0.4]), torch.tensor([3]), "mean").item() == \
        pytest.approx(0.4)
    got = run("sigmoid", 0.5, sft_weight=0.5, chosen_nll=nll)
    assert got.item() == pytest.approx(-logsig(0.15) + 0.5 * 0.4, rel=1e-12)
    with pytest.raises(ValueError, match="chosen_nll"):
        run("sigmoid", 0.5, sft_weight=0.5, nll=False)


def tiny_batch():
    """A 1-layer GPT-2 and one micro-batch of 2 pairs (rows 0, 1 chosen; 2, 3 rejected; prompts
    of 3 and 5 tokens) whose chosen rows count 5 and 3 tokens (loss_mask at positions 3..7 and
    5..7, shifted by one)."""
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=31, n_positions=16, n_embd=8, n_layer=1,
                                       n_head=1)).eval()
    ids = torch.randint(1, 31, (4, 8))
    ids[2, :3], ids[3, :5] = ids[0, :3], ids[1, :5]  # each pair's rows share its prompt
    loss_mask = torch.zeros(4, 8, dtype=torch.bool)
    loss_mask[0, 3:8] = loss_mask[1, 5:8] = loss_mask[2, 3:6] = loss_mask[3, 5:8] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "loss_mask": loss_mask, "prompt_lens": torch.tensor([3, 5, 3, 5])}
    return model, batch


REF = torch.tensor([[-3.0, -4.0], [-2.0, -5.0]])  # cached reference log-probs of the 2 pairs


def test_dpo_batch_counts_chosen_tokens_for_the_nll_term():
    """In a micro-batch with summed log-probs, the NLL term divides each chosen row's log-prob by
    its own counted tokens (from loss_mask, shifted by one): loss(w) − loss(0) = w·(−logp / n)."""
    model, batch = tiny_batch()
    ref, idx = REF, torch.tensor([0, 1])
    base = StepSettings(DPOConfig(beta=0.1, reduction="sum"), precision="fp32")
    rpo = StepSettings(DPOConfig(beta=0.1, reduction="sum", sft_weight=2.0), precision="fp32")
    l0, m = dpo_batch(model, None, ref, idx, batch, base, "cpu")
    l1, _ = dpo_batch(model, None, ref, idx, batch, rpo, "cpu")
    counts = torch.tensor([5.0, 3.0])  # chosen rows 0 and 1: positions 3..7 and 5..7
    torch.testing.assert_close(l1 - l0, 2.0 * -m["logps/chosen"] / counts)


def test_sft_loss_ignores_rejected_reference_and_beta():
    """Preferred-FT on the hand-worked pair is the chosen NLL per token, 1.2 / 3 = 0.4, whatever
    the rejected log-prob, the reference and β; the implicit rewards are still reported as
    β·(log π − log π_ref): 0.5·(−0.2) = −0.1 and 0.5·(−0.5) = −0.25."""
    pc = torch.tensor([-1.2], dtype=torch.float64)
    losses, cr, rj = dpo.dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.0]),
                                  torch.tensor([-1.5]), DPOConfig(beta=0.5, loss="sft"),
                                  chosen_nll=chosen_nll(pc))
    assert losses.item() == pytest.approx(0.4, rel=1e-12)
    assert (cr.item(), rj.item()) == (pytest.approx(-0.1), pytest.approx(-0.25))
    other, _, _ = dpo.dpo_loss(pc, torch.tensor([-9.0]), torch.tensor([0.0]), torch.tensor([-0.1]),
                               DPOConfig(beta=3.0, loss="sft"), chosen_nll=chosen_nll(pc))
    assert other.item() == pytest.approx(0.4, rel=1e-12)
    with pytest.raises(ValueError, match="the sft loss needs chosen_nll"):
        run("sft", 0.5, nll=False)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dpo_batch_sft_loss_is_the_chosen_nll_per_counted_token(reduction):
    """In a micro-batch, the sft loss of each pair is −log π(y_w) over its counted tokens (5 and
    3) with summed log-probs, and −log π(y_w) itself with per-token averaged ones."""
    model, batch = tiny_batch()
    s = StepSettings(DPOConfig(beta=0.1, loss="sft", reduction=reduction), precision="fp32")
    losses, m = dpo_batch(model, None, REF, torch.tensor([0, 1]), batch, s, "cpu")
    counts = torch.tensor([5.0, 3.0]) if reduction == "sum" else torch.ones(2)
    torch.testing.assert_close(losses, -m["logps/chosen"] / counts)
    assert torch.allclose(m["rewards/chosen"], 0.1 * (m["logps/chosen"] - REF[:, 0]))


def test_training_with_sft_raises_the_chosen_logp():
    """Twenty Adam steps on the sft loss of one micro-batch make both chosen responses more
    likely under the policy."""
    model, batch = tiny_batch()
    s = StepSettings(DPOConfig(beta=0.1, loss="sft", reduction="sum"), precision="fp32")
    idx = torch.tensor([0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _, before = dpo_batch(model, None, REF, idx, batch, s, "cpu")
    for _ in range(20):
        losses, _ = dpo_batch(model, None, REF, idx, batch, s, "cpu")
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    _, after = dpo_batch(model, None, REF, idx, batch, s, "cpu")
    assert (after["logps/chosen"] > before["logps/chosen"] + 0.5).all()


def test_the_dpo_section_refuses_the_nll_term_with_sft():
    """The sft loss already is the chosen NLL: an RPO weight on top is refused where the dpo
    section is validated, the one place the loss settings are checked."""
    with pytest.raises(ValueError, match="set dpo.sft_weight: 0"):
        DPOConfig(loss="sft", sft_weight=1.0)


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_per_token_losses_refuse_sum_in_the_config(tmp_path, loss):
    """ipo and simpo are defined on per-token averaged log-probs: `reduction: sum` is a config
    error naming the file, dpo.reduction and what to set instead; `mean` loads."""
    path = tmp_path / "exp.yaml"
    path.write_text(f"dpo:\n  loss: {loss}\n  reduction: sum\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "dpo.reduction" in str(err.value) and "set dpo.reduction: mean" in str(err.value)
    assert load_config(path, {"dpo.reduction": "mean"}).dpo.loss == loss
    with pytest.raises(ValueError, match="set dpo.reduction: mean"):
        DPOConfig(loss=loss, reduction="sum")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("dpo:\n  loss: robust\n  label_smoothing: 0.5\n", "label_smoothing must be in [0, 0.5)"),
        ("dpo:\n  loss: apo_zero\n  label_smoothing: 0.1\n",
         "dpo.label_smoothing: 0.1 applies to the sigmoid and robust losses only"),
        ("dpo:\n  simpo_gamma: -0.5\n", "dpo.simpo_gamma"),
        ("dpo:\n  dpop_lambda: -1\n", "dpo.dpop_lambda"),
        ("dpo:\n  sft_weight: -1\n", "dpo.sft_weight"),
        ("dpo:\n  loss: sft\n  label_smoothing: 0.1\n",
         "dpo.label_smoothing: 0.1 applies to the sigmoid and robust losses only, not 'sft'"),
        ("dpo:\n  loss: sft\n  sft_weight: 0.5\n",
         "dpo.sft_weight: 0.5 adds the chosen responses' NLL, which the sft loss already is"),
    ],
)
def test_bad_loss_settings_are_config_errors(tmp_path, text, needle):
    """Each bad loss setting is a ConfigError that names the field."""
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)


def test_new_loss_fields_reach_the_step():
    """dpo.simpo_gamma, dpo.dpop_lambda and dpo.sft_weight travel from the config to the step."""
    from harness.config import RunConfig

    cfg = RunConfig.model_validate({"dpo": {"loss": "dpop", "dpop_lambda": 7.0, "sft_weight": 0.3,
                                            "simpo_gamma": 1.5}})
    s = StepSettings.from_config(cfg)
    assert s.dpo is cfg.dpo  # the validated section itself, not a copy of its fields
    assert (s.dpo.loss, s.dpo.dpop_lambda, s.dpo.sft_weight, s.dpo.simpo_gamma) == ("dpop", 7.0, 0.3, 1.5)


@pytest.mark.slow
def test_a_run_trains_with_apo_zero_and_the_nll_term(seed_data, tmp_path):
    """End to end on a tiny model: at step 0 (π = π_ref) APO-zero is 1 − σ(0) + σ(0) = 1, and with
    reduction mean the NLL term adds sft_weight × (−mean chosen log-prob), both read from the run's
    own eval row; the run finishes with finite losses."""
    from harness.train import train
    from tests.runs import quick_config, read_metrics

    cfg = quick_config(seed_data, tmp_path, **{"dpo.loss": "apo_zero", "dpo.sft_weight": 0.5,
                                               "dpo.reduction": "mean", "train.max_steps": 3})
    summary = train(cfg, run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    first = next(r for r in rows if "eval/loss" in r)
    assert first["examples_seen"] == 0
    assert first["eval/loss"] == pytest.approx(1 + 0.5 * -first["eval/logps/chosen"], rel=1e-5)
    assert summary["status"] == "finished"
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
