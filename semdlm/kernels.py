"""Forward kernels q(x_t | x_0): masking, uniform, semantic-KNN and SemDLM+ (Eq. 5, 6, 7, 117).

Every kernel is the same three-way mixture (Eq. 117), per token:

    q(x_t = j | x_0 = i) = alpha_t delta_ij + beta_t nu(j) + (1 - alpha_t - beta_t) / k_t * 1[j in N_{k_t}(i)]

- ``mask``:        beta_t = 1 - alpha_t, nu = delta_[MASK]                           (Eq. 5)
- ``uniform``:     beta_t = 1 - alpha_t, nu uniform over the valid vocabulary          (Eq. 6)
- ``knn``:         beta_t = 0, fixed k neighbours (the paper's "SemDLM-KNN")            (Eq. 7)
- ``semdlm_plus``: Eq. 118 schedules, nu uniform or unigram^tau (Eq. 119)               (Eq. 117)

Neighbour tables are ``[V, k_max]`` (self excluded, sorted by similarity) and corruption is a gather: no
``V x V`` tensor is ever built.

Each corrupted token also carries its latent state: which branch of the mixture it took (``CLEAN``, ``GLOBAL`` for
the nu branch, ``NEIGHBOUR + r`` for the r-th neighbour of x_0). The paper's model (the default) sees x_t only; the
latent-state model (ours, ``kernels.<name>.latent_state``, docs/likelihood.md) lets the denoiser see the state.

A ``kernels.<name>`` entry of params.yaml names its family (``type``); ``get_kernel`` builds it from the registry
``FAMILIES``, and the kernel's ``name`` is the entry's key.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from semdlm.config import KernelConfig
from semdlm.schedules import Schedule

CLEAN, GLOBAL, NEIGHBOUR = 0, 1, 2  # latent state tags: clean, nu branch, neighbour slot r is NEIGHBOUR + r


@dataclass
class Kernel:
    """One forward kernel: a schedule, a global-jump distribution nu and an optional neighbour table."""

    name: str
    schedule: Schedule
    nu: torch.Tensor  # [V] float64, sums to 1
    neighbours: torch.Tensor | None = None  # [V, >= k_max] long, self excluded
    mask_id: int | None = None  # set for the absorbing kernel only
    _nu_cdf: torch.Tensor = field(init=False, repr=False)
    _uses_neighbours: bool = field(init=False, repr=False)
    _markov: bool = field(init=False, repr=False)
    _preimage: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        self.nu = self.nu.to(torch.float64)
        if abs(float(self.nu.sum()) - 1.0) > 1e-6 or bool((self.nu < 0).any()):
            raise ValueError(f"kernel {self.name}: nu must be a probability vector")
        self._nu_cdf = torch.cumsum(self.nu, 0)
        self._nu_cdf[-1] = 1.0
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        rest = 1 - self.schedule.alpha(t) - self.schedule.jump_mass(t)
        self._uses_neighbours = bool((rest > 1e-12).any())
        self._markov = bool((rest.abs() <= 1e-12).all())
        if self.uses_neighbours:
            if self.neighbours is None:
                raise ValueError(f"kernel {self.name} needs a neighbour table (run the graph stage)")
            if self.schedule.k_max > self.neighbours.shape[1]:
                raise ValueError(
                    f"kernels.{self.name}.k_max={self.schedule.k_max} is larger than the neighbour table "
                    f"width {self.neighbours.shape[1]}; lower k_max or raise graph.k_max"
                )

    @property
    def vocab_size(self) -> int:
        return self.nu.numel()

    @property
    def is_absorbing(self) -> bool:
        return self.mask_id is not None

    @property
    def num_states(self) -> int:
        """Number of latent state tags: clean, global jump and one per neighbour slot."""
        return NEIGHBOUR + (self.schedule.k_max if self.uses_neighbours else 0)

    @property
    def uses_neighbours(self) -> bool:
        """True when the neighbour branch carries mass somewhere on (0, 1] (fixed at construction)."""
        return self._uses_neighbours

    @property
    def is_markov(self) -> bool:
        """True when beta_t = 1 - alpha_t on [0, 1] (mask, uniform): q_t is then the marginal of the Markov chain
        q_{t|s} = (alpha_t / alpha_s) I + (1 - alpha_t / alpha_s) 1 nu^T (``semdlm.ctmc``)."""
        return self._markov

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, beta_t, neighbour mass 1 - alpha_t - beta_t, integer k_t) for each t."""
        t = t.to(torch.float64)
        a, b = self.schedule.alpha(t), self.schedule.jump_mass(t)
        return a, b, (1.0 - a - b).clamp_min(0.0), self.schedule.k(t)

    def to(self, device: torch.device | str) -> Kernel:
        """A copy whose tables (nu, neighbours) live on ``device``."""
        nb = None if self.neighbours is None else self.neighbours.to(device)
        return Kernel(self.name, self.schedule, self.nu.to(device), nb, self.mask_id)

    def state_probs(self, t: torch.Tensor) -> torch.Tensor:
        """Law of the latent state at times ``t`` ([B]) -> [B, num_states]: alpha_t (clean), beta_t (global), then
        (1 - alpha_t - beta_t) / k_t on each of the first k_t neighbour slots (Eq. 117 split by branch)."""
        a, b, c, k = self.coefficients(t.reshape(-1))
        cols = [a[:, None], b[:, None]]
        slots = self.num_states - NEIGHBOUR
        if slots:
            open_ = torch.arange(slots, device=t.device) < k[:, None]
            cols.append(open_ * (c / k)[:, None])
        return torch.cat(cols, 1)

    def token_of(self, state: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The token a clean (x_0) or neighbour-slot (N(x_0)[r]) state shows; x_0 itself for GLOBAL, whose token is
        a draw from nu that the caller keeps or makes."""
        if self.num_states == NEIGHBOUR:
            return x0
        slot = (state - NEIGHBOUR).clamp_min(0)
        return torch.where(state >= NEIGHBOUR, self.neighbours[x0, slot], x0)

    def known(self, xt: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor | None:
        """Positions whose x_0 is x_t to the model (state CLEAN when it sees the state, else x_t unmasked for the
        absorbing kernel); None when there are none (the paper's model of a non-absorbing kernel)."""
        if state is not None:
            return state == CLEAN
        return xt != self.mask_id if self.is_absorbing else None

    def constrain(self, logits: torch.Tensor, xt: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """Restrict logits of p_theta(x_0 | x_t, state) ([..., V], matching ``xt``) to the x_0 consistent with what
        the model sees: never [MASK]; x_0 = x_t where it is known (carry-over, MDLM's SUBS: state CLEAN, or x_t
        unmasked for the absorbing kernel); x_0 in {y : N(y)[r] = x_t} at neighbour slot r."""
        if self.is_absorbing:
            logits = logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), float("-inf"))
        known = self.known(xt, state)
        if known is not None and bool(known.any()):
            at = known.nonzero(as_tuple=True)  # write only the known rows: delta at x_t
            rows = torch.full((len(at[0]), logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device)
            logits = logits.index_put(at, rows.scatter_(1, xt[at][:, None], 0.0))
        if state is not None and self.num_states > NEIGHBOUR:
            at = (state >= NEIGHBOUR).nonzero(as_tuple=True)
            if len(at[0]):
                row, y = self.preimage_entries(xt[at], state[at] - NEIGHBOUR)
                keep = torch.zeros(len(at[0]), logits.shape[-1], dtype=torch.bool, device=logits.device)
                keep[row, y] = True
                logits = logits.index_put(at, logits[at].masked_fill(~keep, float("-inf")))
        return logits

    def preimage_logsumexp(self, logits: torch.Tensor, at: tuple[torch.Tensor, ...], xt: torch.Tensor,
                           slot: torch.Tensor) -> torch.Tensor:
        """log sum_{y : N(y)[r] = x_t} exp(logits[at][y]) for the positions ``at`` of ``logits`` ([..., V]) at
        neighbour slots ``slot`` = r, in ``logits``' dtype promoted to float32 at least: the normaliser of
        ``constrain``'s slot rows, summed over the preimage lists ([k_max, V] tables) alone."""
        seg, y = self.preimage_entries(xt, slot)
        vals = logits[(*(i[seg] for i in at), y)]
        vals = vals.to(torch.promote_types(vals.dtype, torch.float32))
        top = torch.full(xt.shape, float("-inf"), dtype=vals.dtype, device=vals.device)
        top = top.scatter_reduce(0, seg, vals.detach(), "amax")
        total = torch.zeros_like(top).index_add(0, seg, (vals - top[seg]).exp())
        return top + total.log()

    def preimage_entries(self, xt: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, y) for every y of the preimage {y : N(y)[r] = x_t} of each position i ([n] ``xt``, ``slot`` = r)."""
        order, start, count = self._preimages()
        c = count[slot, xt]  # |preimage| per position, >= 1 for a reachable (x_t, r)
        i = torch.repeat_interleave(torch.arange(len(c), device=c.device), c)
        offset = torch.arange(len(i), device=c.device) - (torch.cumsum(c, 0) - c)[i]
        return i, order[slot[i], start[slot[i], xt[i]] + offset]

    def _preimages(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per neighbour slot r, the ids y sorted by N(y)[r], and where each x's preimage starts and its size."""
        if self._preimage is None:
            nb = self.neighbours[:, : self.num_states - NEIGHBOUR].T.contiguous()  # [k_max, V]
            keys, order = torch.sort(nb, dim=1, stable=True)
            ids = torch.arange(self.vocab_size, device=nb.device).expand_as(nb).contiguous()
            start = torch.searchsorted(keys, ids)
            self._preimage = order, start, torch.searchsorted(keys, ids, right=True) - start
        return self._preimage

    def sample_nu(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.nu.device
        u = torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
        return torch.searchsorted(self._nu_cdf, u.reshape(-1), right=True).clamp_max(self.vocab_size - 1).view(shape)

    def sample_xt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(. | x_0) per token; ``t`` has one entry per sequence ([B]) and x0 is [B, L]."""
        return self.corrupt(x0, t, generator)[0]

    def corrupt(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, state): the latent state tag per token (``CLEAN`` with probability alpha_t, ``GLOBAL``, or
        ``NEIGHBOUR + r`` for the r-th neighbour). A corrupted token can still equal x_0 (nu may put mass on it)."""
        a, b, _, k = (c.view(-1, *([1] * (x0.dim() - 1))) for c in self.coefficients(t))
        u = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=x0.device)
        xt = torch.where(u < a + b, self.sample_nu(tuple(x0.shape), generator), x0)
        xt = torch.where(u < a, x0, xt)
        state = torch.where(u < a, CLEAN, GLOBAL)
        if self.uses_neighbours:
            v = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=x0.device)
            rank = torch.floor(v * k).long().clamp_max(k.expand_as(x0) - 1)  # uniform over the top-k_t
            xt = torch.where(u >= a + b, self.neighbours[x0, rank], xt)
            state = torch.where(u >= a + b, NEIGHBOUR + rank, state)
        return xt, state

    def probs(self, x0: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Closed-form rows q(x_t = . | x_0) as a dense [N, V] float64 tensor (for N positions, never V x V)."""
        x0 = x0.reshape(-1)
        a, b, c, k = self.coefficients(torch.as_tensor(t, dtype=torch.float64, device=x0.device).reshape(1))
        rows = (b * self.nu).expand(x0.numel(), -1).clone()
        rows[torch.arange(x0.numel(), device=x0.device), x0] += a
        if self.uses_neighbours:
            kk = int(k)
            rows.scatter_add_(1, self.neighbours[x0, :kk], (c / kk).expand(x0.numel(), kk).clone())
        return rows

    def sample_prior(
        self, shape: tuple[int, ...], unigram: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_1, state_1) ~ sum_i m(i) q_1(. | i): the kernel's reference distribution when x_0 follows ``unigram``.

        For mask, uniform and SemDLM+ with alpha_min = 0, beta_max = 1 the token law is nu whatever ``unigram`` is.
        """
        n = int(torch.tensor(shape).prod())
        x0 = torch.multinomial(unigram.to(self.nu.device, torch.float64), n, True, generator=generator)
        return self.corrupt(x0.view(shape), torch.ones(shape[0], dtype=torch.float64, device=x0.device), generator)


def masking(vocab_size: int, mask_id: int, name: str = "mask") -> Kernel:
    nu = torch.zeros(vocab_size, dtype=torch.float64)
    nu[mask_id] = 1.0
    return Kernel(name, Schedule(), nu, mask_id=mask_id)


def uniform(valid: torch.Tensor, name: str = "uniform") -> Kernel:
    nu = valid.to(torch.float64) / valid.sum()
    return Kernel(name, Schedule(), nu)


def knn(valid: torch.Tensor, neighbours: torch.Tensor, k: int, name: str = "knn") -> Kernel:
    nu = valid.to(torch.float64) / valid.sum()  # unused (beta_t = 0); kept so every kernel has a nu
    return Kernel(name, Schedule(beta_max=0.0, k_max=k, gamma=0.0), nu, neighbours)


def semdlm_plus(nu: torch.Tensor, neighbours: torch.Tensor, schedule: Schedule, name: str = "semdlm_plus") -> Kernel:
    return Kernel(name, schedule, nu, neighbours)


@dataclass(frozen=True)
class Tables:
    """What a family may build its kernel from: the [MASK] id, the valid ids and the unigram nu of the prior stage,
    the graph stage's [V, k_max] neighbour table (None where the family does not use it)."""

    mask_id: int
    valid: torch.Tensor
    unigram_nu: torch.Tensor
    neighbours: torch.Tensor | None


def _knn(name: str, cfg: KernelConfig, tab: Tables) -> Kernel:
    if cfg.k > tab.neighbours.shape[1]:
        raise ValueError(f"kernels.{name}.k={cfg.k} is larger than the neighbour table width "
                         f"{tab.neighbours.shape[1]}; lower k or raise graph.k_max")
    return knn(tab.valid, tab.neighbours, cfg.k, name)


def _semdlm_plus(name: str, cfg: KernelConfig, tab: Tables) -> Kernel:
    schedule = Schedule(cfg.alpha_min, cfg.beta, cfg.beta_max, cfg.eta, cfg.k_max, cfg.gamma)
    try:
        schedule.validate()
    except ValueError as e:
        raise ValueError(f"kernels.{name}: {e}") from None
    nu = tab.unigram_nu if cfg.nu == "unigram" else tab.valid.to(torch.float64) / tab.valid.sum()
    return semdlm_plus(nu, tab.neighbours, schedule, name)


@dataclass(frozen=True)
class Family:
    """A kernel family of the registry: how to build it from its config, and whether it needs the graph."""

    build: Callable[[str, KernelConfig, Tables], Kernel]
    uses_graph: bool


FAMILIES: dict[str, Family] = {
    "mask": Family(lambda name, cfg, tab: masking(tab.valid.numel(), tab.mask_id, name), False),  # Eq. 5
    "uniform": Family(lambda name, cfg, tab: uniform(tab.valid, name), False),  # Eq. 6
    "knn": Family(_knn, True),  # Eq. 7
    "semdlm_plus": Family(_semdlm_plus, True),  # Eq. 117-118
}


def family(type: str, name: str | None = None) -> Family:
    """The registered family ``type`` (``kernels.<name>.type``, the key itself when the entry names none)."""
    if type not in FAMILIES:
        close = difflib.get_close_matches(type, FAMILIES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        entry = name or type
        raise ValueError(f"unknown kernel {type!r} in params.yaml kernels{hint}: kernels.{entry}.type must name a "
                         f"family, e.g. kernels.{entry}.type: semdlm_plus (one of {', '.join(FAMILIES)})")
    return FAMILIES[type]


def get_kernel(
    type: str,
    cfg: KernelConfig,
    *,
    mask_id: int,
    valid: torch.Tensor,
    unigram_nu: torch.Tensor,
    neighbours: torch.Tensor | None,
    name: str | None = None,
) -> Kernel:
    """The kernel of family ``type`` with the settings ``cfg``, named ``name`` (the ``kernels.<name>`` key of
    params.yaml; the family's name when None)."""
    fam = family(type, name)
    if fam.uses_graph and neighbours is None:
        raise ValueError(f"kernel {name or type!r} ({type}) needs the neighbour table of the graph stage")
    return fam.build(name or type, cfg, Tables(mask_id, valid, unigram_nu, neighbours))
