"""The training step's math (semdlm.training): EMA warm-up, rank-local batches, the Eq. 120 normaliser, guards, the
optimiser step and the state a run resumes from; the model's file."""

import dataclasses
import io

import numpy as np
import pytest
import torch

from semdlm.config import KernelConfig, ModelConfig, TrainConfig
from semdlm.kernels import masking, uniform
from semdlm.loss import change_weights
from semdlm.model import Denoiser
from semdlm.training import (
    EMA,
    ImpossibleTarget,
    TrainState,
    draw_batch,
    normaliser,
    optimizer_step,
    sharded_mean,
    train_step,
)

V, L = 13, 8


def tiny_model(dropout: float = 0.0) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(V, L, ModelConfig(d_model=8, n_layers=1, n_heads=2, dropout=dropout))


@pytest.mark.parametrize(("decay", "rates"), [
    (0.5, (2 / 11, 3 / 12, 4 / 13)),  # MDLM's warm-up min(decay, (1 + n) / (10 + n)) below the decay
    (0.2, (2 / 11, 0.2, 0.2)),  # ... capped by it
])
def test_ema_warm_up_matches_a_hand_computation(decay, rates):
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = EMA(model, decay)
    expected = 0.0
    for n, rate in enumerate(rates, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(n))  # the weights after optimiser step n
        ema.update(model)
        expected = rate * expected + (1 - rate) * n
        assert ema.updates == n
        for p in ema.model.parameters():
            torch.testing.assert_close(p, torch.full_like(p, expected))


def test_ema_state_round_trips_with_its_update_count():
    model = tiny_model()
    ema = EMA(model, 0.9)
    ema.update(model)
    other = EMA(tiny_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.rate(other.updates + 1) == 3 / 12


def draw(rows: np.ndarray, pieces: int, mine: range, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = TrainConfig(batch_size=8)
    batch = draw_batch(rows, uniform(torch.ones(V, dtype=torch.bool)), cfg, KernelConfig(lambda_same=0.1), gen,
                       pieces, mine)
    return batch, gen.get_state()


def test_a_ranks_micro_batches_are_those_of_the_whole_batch_and_the_generator_advances_alike():
    rows = np.random.default_rng(0).integers(0, V, (50, L)).astype(np.uint16)
    whole, state = draw(rows, 4, range(4))
    for rank in range(2):  # 2 ranks x 2 micro-batches each
        part, part_state = draw(rows, 4, range(2 * rank, 2 * rank + 2))
        assert torch.equal(part_state, state)
        for f in ("x0", "xt", "state", "t", "omega"):
            assert torch.equal(getattr(part, f), getattr(whole, f)[4 * rank : 4 * rank + 4]), f
        assert part.seeds == whole.seeds[2 * rank : 2 * rank + 2]
    other, _ = draw(rows, 4, range(4), seed=1)
    assert not torch.equal(other.xt, whole.xt)


def test_the_normaliser_from_counts_is_eq_120s_sum_of_weights():
    rows = np.random.default_rng(1).integers(0, V, (50, L)).astype(np.uint16)
    batch, _ = draw(rows, 2, range(2))
    kcfg = KernelConfig(lambda_same=0.1)
    w = change_weights(batch.x0, batch.xt, kcfg.lambda_chg, kcfg.lambda_same, torch.float64).sum()
    torch.testing.assert_close(normaliser(batch.counts, kcfg).double(), w, rtol=1e-7, atol=0)


def test_a_batch_packs_into_one_tensor_and_back_bit_for_bit():
    rows = np.random.default_rng(2).integers(0, V, (50, L)).astype(np.uint16)
    batch, _ = draw(rows, 2, range(2))
    flat = batch.pack()
    assert flat.dim() == 1 and flat.dtype == torch.int64  # one host-to-device copy
    back = batch.unpack(flat)
    for f in ("x0", "xt", "state", "t", "omega", "counts"):
        assert getattr(back, f).dtype == getattr(batch, f).dtype and torch.equal(getattr(back, f), getattr(batch, f))


def test_a_clean_token_whose_logit_is_minus_inf_is_refused_before_the_loss():
    rows = np.zeros((6, L), dtype=np.uint16)
    rows[4, 3] = V - 1  # the corpus spelled [MASK]
    gen = torch.Generator().manual_seed(0)
    kernel = masking(V, V - 1)
    with pytest.raises(ImpossibleTarget, match=f"sequence 4 has token id {V - 1}") as e:
        for _ in range(20):  # drawn with replacement: row 4 comes up within a few steps
            draw_batch(rows, kernel, TrainConfig(batch_size=4), KernelConfig(), gen, never=V - 1)
    assert (e.value.row, e.value.token) == (4, V - 1)


def test_the_dropout_of_a_micro_batch_is_a_function_of_its_seed():
    model = tiny_model(dropout=0.5)
    rows = np.random.default_rng(3).integers(0, V, (50, L)).astype(np.uint16)
    batch, _ = draw(rows, 1, range(1))
    kernel, kcfg = uniform(torch.ones(V, dtype=torch.bool)), KernelConfig(lambda_same=0.1)
    norm = normaliser(batch.counts, kcfg)
    with torch.no_grad():
        losses = [float(train_step(model, kernel, batch, slice(None), kcfg, norm, False, seed)) for seed in (7, 7, 8)]
    assert losses[0] == losses[1] != losses[2]


def stepping(dropout: float = 0.1, ema: float = 0.5, grad_accum: int = 2):
    """A tiny model's TrainState, its configs and rows to draw from."""
    cfg = TrainConfig(batch_size=8, warmup_steps=2, steps=6, ema=ema, grad_accum=grad_accum)
    kernel, kcfg = uniform(torch.ones(V, dtype=torch.bool)), KernelConfig(lambda_same=0.1)
    rows = np.random.default_rng(4).integers(0, V, (50, L)).astype(np.uint16)
    return TrainState.new(tiny_model(dropout), cfg), cfg, kernel, kcfg, rows


def test_optimizer_step_is_accumulation_clipping_adamw_schedule_and_ema_in_that_order():
    state, cfg, kernel, kcfg, rows = stepping()
    by_hand, *_ = stepping()
    for _ in range(3):
        batch = draw_batch(rows, kernel, cfg, kcfg, state.gen, pieces=2, mine=range(2))
        assert torch.equal(draw_batch(rows, kernel, cfg, kcfg, by_hand.gen, pieces=2, mine=range(2)).xt, batch.xt)
        loss = optimizer_step(state, state.model, kernel, batch, cfg, kcfg, False)
        by_hand.optimizer.zero_grad(set_to_none=True)
        norm, total = normaliser(batch.counts, kcfg), 0.0
        for j, rows_j in enumerate((slice(0, 4), slice(4, 8))):
            part = train_step(by_hand.model, kernel, batch, rows_j, kcfg, norm, False, batch.seeds[j])
            part.backward()
            total += float(part.detach())
        torch.nn.utils.clip_grad_norm_(by_hand.model.parameters(), cfg.grad_clip)
        by_hand.optimizer.step()
        by_hand.scheduler.step()
        by_hand.ema.update(by_hand.model)
        assert float(loss) == pytest.approx(total, rel=1e-6)
    assert (state.step, state.ema.updates) == (3, 3)
    assert state.scheduler.get_last_lr() == by_hand.scheduler.get_last_lr()
    for a, b in ((state.model, by_hand.model), (state.ema.model, by_hand.ema.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_a_train_state_saved_and_loaded_resumes_bitwise():
    def steps(state, cfg, kernel, kcfg, rows, n):
        for _ in range(n):
            batch = draw_batch(rows, kernel, cfg, kcfg, state.gen, pieces=2, mine=range(2))
            optimizer_step(state, state.model, kernel, batch, cfg, kcfg, False)

    whole, cfg, kernel, kcfg, rows = stepping()
    steps(whole, cfg, kernel, kcfg, rows, 4)
    first, *_ = stepping()
    steps(first, cfg, kernel, kcfg, rows, 2)
    first.train_log.append({"step": 2})
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    resumed, *_ = stepping()
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert (resumed.step, resumed.train_log, resumed.ema.updates) == (2, [{"step": 2}], 2)
    steps(resumed, cfg, kernel, kcfg, rows, 2)
    assert torch.equal(resumed.gen.get_state(), whole.gen.get_state())
    for a, b in ((resumed.model, whole.model), (resumed.ema.model, whole.ema.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_the_sharded_mean_is_the_mean_of_the_block_means_weighted_by_their_sizes():
    values = torch.arange(10, dtype=torch.float64) ** 2
    got = sharded_mean(lambda k, rows: [float(values[rows].mean()), float(-values[rows].mean())], 10, 4, width=2)
    assert got == pytest.approx([float(values.mean()), -float(values.mean())], rel=1e-12)  # blocks of 4, 4 and 2


def test_model_pt_round_trips_weights_only_with_its_run_metadata(tmp_path):
    model = Denoiser.for_kernel(ModelConfig(d_model=8, n_layers=1, n_heads=2), masking(V, V - 1), L, latent=False)
    model.save(tmp_path / "model.pt", kernel="mask", steps=3)
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    assert blob["meta"] == {"vocab_size": V, "seq_len": L, "model": dataclasses.asdict(model.cfg), "mask_id": V - 1,
                            "num_states": 0, "kernel": "mask", "steps": 3}
    back = Denoiser.load(tmp_path / "model.pt")
    assert not back.training and back.mask_id == V - 1
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))
