import math

import pytest
import torch

from semdlm.config import ConfigError, KernelConfig, parse_params
from semdlm.kernels import FAMILIES, family, get_kernel, knn, masking, semdlm_plus, uniform
from semdlm.schedules import Schedule
from tests.stats import assert_frequencies_match

V = 8
VALID = torch.tensor([True] * 6 + [False, False])  # ids 6, 7 are "special" (7 = [MASK])
NEIGHBOURS = torch.tensor([[(i + d) % 6 for d in (1, 2, 3, 4)] for i in range(6)] + [[0, 1, 2, 3], [0, 1, 2, 3]])


def kernels():
    nu = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0], dtype=torch.float64)
    return {
        "mask": masking(V, 7),
        "uniform": uniform(VALID),
        "knn": knn(VALID, NEIGHBOURS, 3),
        "semdlm_plus": semdlm_plus(nu, NEIGHBOURS, Schedule(alpha_min=0.0, beta=1.0, beta_max=1.0, eta=2.0,
                                                            k_max=4, gamma=1.0)),
    }


KERNELS = list(kernels())  # every toy test of the kernels' laws, bounds and samplers runs over these


def closed_form(name: str, i: int, t: float) -> torch.Tensor:
    """Eq. 5, 6, 7 and 117-118 written out by hand for one source token i."""
    row = torch.zeros(V, dtype=torch.float64)
    if name == "mask":
        row[i] += 1 - t
        row[7] += t
    elif name == "uniform":
        row[i] += 1 - t
        row[:6] += t / 6
    elif name == "knn":
        row[i] += 1 - t
        for j in NEIGHBOURS[i, :3]:
            row[j] += t / 3
    else:
        a, b = 1 - t, t**2
        k = math.floor(1 + 3 * t + 1e-9)
        row[i] += a
        row += b * torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0], dtype=torch.float64)
        for j in NEIGHBOURS[i, :k]:
            row[j] += (1 - a - b) / k
    return row


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
@pytest.mark.parametrize("t", [0.0, 0.2, 0.55, 0.9, 1.0])
def test_probs_match_closed_form(name, t):
    k = kernels()[name]
    rows = k.probs(torch.arange(6), t)
    for i in range(6):
        torch.testing.assert_close(rows[i], closed_form(name, i, t))
    torch.testing.assert_close(rows.sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
@pytest.mark.parametrize("t", [0.25, 0.6, 0.95])
def test_sample_xt_frequencies_match_marginal_chi_square(name, t):
    k = kernels()[name]
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = torch.tensor([2, 5]).repeat(n // 2, 1)  # [n/2, 2]: two source tokens
    xt = k.sample_xt(x0, torch.full((n // 2,), t, dtype=torch.float64), gen)
    for pos, src in enumerate((2, 5)):
        assert_frequencies_match(xt[:, pos], k.probs(torch.tensor([src]), t)[0])


def test_t0_is_identity_and_t1_is_reference():
    ks = kernels()
    x0 = torch.arange(6).repeat(5, 1)
    for k in ks.values():
        assert torch.equal(k.sample_xt(x0, torch.zeros(5, dtype=torch.float64)), x0)
    ones = torch.ones(6, dtype=torch.float64)
    assert (ks["mask"].sample_xt(x0, ones[:5]) == 7).all()
    torch.testing.assert_close(ks["uniform"].probs(torch.arange(6), 1.0), VALID.double().expand(6, -1) / 6)
    torch.testing.assert_close(ks["semdlm_plus"].probs(torch.arange(6), 1.0), ks["semdlm_plus"].nu.expand(6, -1))


def test_schedule_rejects_alpha_plus_beta_above_one():
    with pytest.raises(ValueError, match="alpha_t \\+ beta_t"):
        Schedule(alpha_min=0.5, beta_max=0.8, eta=1.0).validate()
    with pytest.raises(ValueError, match="alpha_min"):
        Schedule(alpha_min=1.5).validate()


def test_get_kernel_rejects_k_max_wider_than_table_naming_the_entry():
    cfg = KernelConfig(type="semdlm_plus", k_max=9)
    with pytest.raises(ValueError, match="kernels.plus_wide.k_max=9 is larger than the neighbour table width 4"):
        get_kernel("semdlm_plus", cfg, mask_id=7, valid=VALID, unigram_nu=kernels()["semdlm_plus"].nu,
                   neighbours=NEIGHBOURS, name="plus_wide")


def test_the_registry_holds_every_family_and_names_the_kernel_by_its_entry():
    assert tuple(FAMILIES) == tuple(KERNELS) == ("mask", "uniform", "knn", "semdlm_plus")
    assert [n for n in FAMILIES if family(n).uses_graph] == ["knn", "semdlm_plus"]
    tables = {"mask_id": 7, "valid": VALID, "unigram_nu": kernels()["semdlm_plus"].nu, "neighbours": NEIGHBOURS}
    for n in FAMILIES:
        k = get_kernel(n, KernelConfig(type=n, k=3, k_max=4, nu="unigram"), **tables, name=f"{n}_variant")
        assert k.name == f"{n}_variant"
        torch.testing.assert_close(k.probs(torch.arange(6), 0.4), kernels()[n].probs(torch.arange(6), 0.4))
    assert get_kernel("uniform", KernelConfig(type="uniform"), **tables).name == "uniform"
    with pytest.raises(ValueError, match="unknown kernel 'gauss' in params.yaml kernels"):
        get_kernel("gauss", KernelConfig(), **tables)
    with pytest.raises(ValueError, match="needs the neighbour table"):
        get_kernel("knn", KernelConfig(type="knn"), **{**tables, "neighbours": None})


def test_only_the_kernels_without_neighbours_are_markov_chains_in_x_t():
    assert [n for n, k in kernels().items() if k.is_markov] == ["mask", "uniform"]


def test_a_kernel_entry_names_its_family_and_model_and_defaults_both():
    p = parse_params({"kernels": {"semdlm_plus": {"k_max": 4}, "semdlm_plus_latent": {"type": "semdlm_plus",
                                                                                      "latent_state": True}}})
    assert p.kernels["semdlm_plus"].type == "semdlm_plus" and not p.kernels["semdlm_plus"].latent_state
    assert p.kernels["semdlm_plus_latent"].type == "semdlm_plus" and p.kernels["semdlm_plus_latent"].latent_state
    tables = {"mask_id": 7, "valid": VALID, "unigram_nu": kernels()["semdlm_plus"].nu, "neighbours": NEIGHBOURS}
    for entry, hint in (({}, "plus2"), ({"type": "gauss"}, "gauss")):  # the registry checks the family (one place)
        cfg = parse_params({"kernels": {"plus2": entry}}).kernels["plus2"]
        with pytest.raises(ValueError, match=rf"unknown kernel '{hint}'.*kernels.plus2.type: semdlm_plus"):
            get_kernel(cfg.type, cfg, **tables, name="plus2")
    with pytest.raises(ConfigError, match="model.latent_state moved to each kernel entry.*kernels.<name>.latent_state"):
        parse_params({"model": {"latent_state": True}})


def test_unknown_nu_is_a_config_error():
    with pytest.raises(ConfigError, match="nu='zipf'"):
        KernelConfig(nu="zipf")


def test_corruption_of_full_bert_vocab_allocates_a_few_mb_not_v_by_v():
    Vb, k_max = 30_522, 64
    nb = torch.randint(0, Vb, (Vb, k_max))
    valid = torch.ones(Vb, dtype=torch.bool)
    kernel = semdlm_plus(valid.double() / Vb, nb, Schedule(eta=2.0, k_max=k_max))
    x0 = torch.randint(0, Vb, (64, 128))
    t = torch.rand(64, dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        xt = kernel.sample_xt(x0, t)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert xt.shape == x0.shape
    assert 0 < allocated < 8 * 2**20, f"sample_xt allocated {allocated / 2**20:.1f} MiB (V x V would be 7 GiB)"
