"""The library on a CUDA device gives the laws and values that the CPU tests pin down.

Skipped where torch sees no GPU (CI is CPU-only); on a GPU machine: ``python -m pytest tests/test_cuda.py``.
Kernels, generators and sampler state live on the GPU; the toy denoisers of tests/toy.py are called through a
device boundary that checks the samplers hand them GPU tensors. ``SEMDLM_TEST_DEVICE=cpu`` runs the same checks
on the CPU (to check the tests themselves where no GPU is at hand).
"""

import dataclasses
import os

import pytest
import torch

from semdlm.config import KernelConfig, ModelConfig, TrainConfig
from semdlm.likelihood import latent_bound, latent_prior_kl, marginal_bound, marginal_prior_kl, markov_bound
from semdlm.model import Denoiser
from semdlm.samplers import SAMPLERS
from semdlm.training import corrupt_batch, normaliser, train_step
from tests.test_kernels import KERNELS, kernels
from tests.test_likelihood import exact
from tests.test_likelihood import toy as likelihood_toy
from tests.test_samplers import SIX, law_tv, model_law, run_sampler
from tests.toy import imperfect_denoiser

DEVICE = torch.device(os.environ.get("SEMDLM_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="torch sees no CUDA device")


def through_device(denoise):
    """``denoise`` (a CPU toy function) as a network on the GPU: inputs must arrive there, logits go back there."""
    def on_gpu(xt, t, state):
        on = {x.device.type for x in (xt, t, state) if x is not None}
        assert on == {DEVICE.type}, f"the sampler handed the network tensors on {on}"
        out = denoise(xt.cpu(), t.cpu(), None if state is None else state.cpu())
        return out.to(xt.device)

    return on_gpu


@pytest.mark.parametrize("latent", [True, False], ids=["latent", "paper"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("name", KERNELS)
def test_every_sampler_on_cuda_draws_from_the_chain_law(name, sampler, latent):
    if sampler == "tau_leaping" and name == "uniform" and not latent:
        pytest.skip("the paper's uniform tau-leaping is another discretisation (tests/test_samplers.py)")
    denoise = through_device(imperfect_denoiser(SIX, kernels()[name], latent))
    res = run_sampler(sampler, name, latent, denoise, 8, device=DEVICE)
    assert res.ids.device.type == DEVICE.type
    assert law_tv(res.ids.cpu(), model_law(name, latent, 8)) < 0.035


@pytest.mark.parametrize("latent", [True, False], ids=["latent", "paper"])
@pytest.mark.parametrize("name", KERNELS)
def test_bound_estimators_on_cuda_match_the_enumerated_bound(name, latent):
    # the bound of each kernel's model: latent_bound, the Markov chain's D3PM bound (mask, uniform), or the
    # state-marginalised one (knn, SemDLM+)
    toy, T = likelihood_toy(), (8 if latent or kernels()[name].is_markov else 4)
    kernel = kernels()[name].to(DEVICE)
    m = toy.token_marginal()
    prior = (latent_prior_kl if latent else marginal_prior_kl)(kernel, m.to(DEVICE))
    torch.testing.assert_close(prior.cpu(), (latent_prior_kl if latent else marginal_prior_kl)(kernels()[name], m))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = toy.sample(4000, torch.Generator().manual_seed(0)).to(DEVICE)
    fn = latent_bound if latent else markov_bound if kernel.is_markov else marginal_bound
    v = fn(through_device(imperfect_denoiser(toy, kernels()[name], latent)), kernel, x0, T, prior, gen) * toy.L
    est, se = float(v.mean()), float(v.std() / len(v) ** 0.5)
    b, _ = exact(name, latent, "imperfect", T)
    assert abs(est - b) < 4 * se + 0.01, (est, b, se)


@pytest.mark.parametrize("name", ["mask", "semdlm_plus"])
def test_training_step_on_cuda_is_the_cpu_step(name):
    # the same batch, weights and loss on both devices: float32 agrees closely, bf16 autocast within 2 %
    V, L = 8, 16
    kernel = kernels()[name]
    kcfg, tcfg = KernelConfig(), TrainConfig()
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    torch.manual_seed(0)
    cpu = Denoiser(V, L, cfg, kernel.mask_id, kernel.num_states)
    gpu = Denoiser(V, L, dataclasses.replace(cfg), kernel.mask_id, kernel.num_states).to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    x0 = torch.randint(0, 6, (4, L), generator=torch.Generator().manual_seed(1))
    batch = corrupt_batch(x0, kernel, tcfg, kcfg, torch.Generator().manual_seed(2))
    norm = normaliser(batch.counts, kcfg)
    on_gpu = batch.to(DEVICE)
    assert torch.equal(on_gpu.xt.cpu(), batch.xt) and torch.equal(on_gpu.t.cpu(), batch.t)
    ref = train_step(cpu, kernel, batch, slice(None), kcfg, norm, True)
    got = train_step(gpu, kernel.to(DEVICE), on_gpu, slice(None), kcfg, norm.to(DEVICE), True)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)
    ref.backward()
    got.backward()
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=n)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        half = train_step(gpu, kernel.to(DEVICE), on_gpu, slice(None), kcfg, norm.to(DEVICE), True)
    h, r = float(half.detach()), float(ref.detach())
    assert abs(h - r) < 0.02 * abs(r), (h, r)
