"""Exact enumeration of the T-step chains that the samplers draw from, on the toy problem, and of their bounds.

Everything here is dense and written from the definitions (state laws, the reverse state law R, token moves, the
Markov transition matrix and Bayes' rule), independently of the closed forms in ``semdlm.likelihood`` and
``semdlm.ctmc``: the chain's law of x_0, its exact NLL, and the discrete-time ELBO summed over every grid step and
every reachable state with brute-force KL terms. Three chains: ``LatentChain`` (ours: the latent-state model),
``MarkovChain`` (the paper's model of mask and uniform) and ``MarginalChain`` (the paper's model of knn, SemDLM+).
"""

from __future__ import annotations

import itertools

import torch

from semdlm.kernels import CLEAN, GLOBAL, NEIGHBOUR, Kernel
from semdlm.latent import reverse_probs
from tests.toy import Toy, local_likelihood


def _kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.where(q > 0, q * (q.clamp_min(1e-300).log() - p.clamp_min(1e-300).log()), torch.zeros_like(q)).sum(-1)


def independent(local: torch.Tensor, L: int) -> torch.Tensor:
    """The joint law of L positions that each follow ``local`` independently ([n^L])."""
    out = local
    for _ in range(L - 1):
        out = (out[:, None] * local[None]).reshape(-1)
    return out


class LatentChain:
    """The latent-state model: a position's local state is (state, token), index state * vocab + token."""

    def __init__(self, toy: Toy, kernel: Kernel, m: torch.Tensor) -> None:
        self.toy, self.kernel, self.m = toy, kernel, m
        self.S, self.Vk = kernel.num_states, toy.vocab
        self.n = self.S * self.Vk
        idx = torch.arange(self.n)
        self.state_of, self.token_of = idx // self.Vk, idx % self.Vk
        self.joint = torch.tensor(list(itertools.product(range(self.n), repeat=toy.L)))  # [J, L]

    def local_given_x0(self, t: float) -> torch.Tensor:
        """q(local state at t | x_0 = v) ([vocab, n])."""
        return local_likelihood(self.kernel, self.state_of, self.token_of, t).T

    def moves(self, p: torch.Tensor, local: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Law of the local state at s ([N, n]) from local states ``local`` ([N]) when x_0 ~ p ([N, vocab]):
        new state by R, token kept if the state stays, else x_0 (CLEAN) or N(x_0)[r] (slot r)."""
        st, x = self.state_of[local], self.token_of[local]
        out = torch.zeros(len(local), self.n, dtype=torch.float64)
        rows = torch.arange(len(local))
        out[rows, st * self.Vk + x] += R[st, st]  # the state stays: so does the token
        for j in range(self.S):
            if j == GLOBAL:
                continue  # GLOBAL is entered only from itself in reverse
            w = (R[st, j] * (st != j))[:, None] * p  # [N, vocab]: enter state j with x_0 = v
            tokens = torch.arange(self.Vk) if j == CLEAN else self.kernel.neighbours[: self.Vk, j - NEIGHBOUR]
            out.index_add_(1, j * self.Vk + tokens, w)
        return out

    def rows(self, denoise, t: float, s: float) -> list[torch.Tensor]:
        """The model's transition t -> s from every joint state, per position ([J, n] each; they multiply)."""
        J = self.joint
        xt, st = self.token_of[J], self.state_of[J]
        logits = self.kernel.constrain(denoise(xt, torch.full((len(J),), t), st), xt, st)
        p = torch.softmax(logits.double(), -1).nan_to_num(0.0)  # [J, L, vocab]; 0 rows at unreachable states
        R = reverse_probs(self.kernel, t, s)[0]
        return [self.moves(p[:, i], J[:, i], R) for i in range(self.toy.L)]

    def truth(self, v: int, i: int, t: float, s: float) -> torch.Tensor:
        """q(local state of position i at s | joint state at t, x_0^i = v) ([J, n])."""
        R = reverse_probs(self.kernel, t, s)[0]
        onehot = torch.nn.functional.one_hot(torch.tensor(v), self.Vk).double().expand(len(self.joint), -1)
        return self.moves(onehot, self.joint[:, i], R)

    def reach(self, t: float) -> torch.Tensor:
        """q(local state of position i at t = J's | x_0^i = v) ([vocab, J, L])."""
        return self.local_given_x0(t)[:, self.joint]

    def initial(self) -> torch.Tensor:
        return independent(self.m @ self.local_given_x0(1.0), self.toy.L)

    def x0_law(self, denoise, steps: int) -> torch.Tensor:
        """Law of the chain's output over the toy's data sequences ([V^L])."""
        law = run(self, denoise, steps)
        toks, states = self.token_of[self.joint], self.state_of[self.joint]
        clean = (states == CLEAN).all(1)
        assert float(law[~clean].sum()) < 1e-9  # every position is clean at t = 0
        data = (toks < self.toy.V).all(1) & clean
        return torch.zeros(len(self.toy.seqs), dtype=torch.float64).index_add_(0, self.toy.index(toks[data]), law[data])

    def prior(self) -> torch.Tensor:
        """KL(q(local state at 1 | x_0) || model's) per data token ([V])."""
        q1 = self.local_given_x0(1.0)
        return _kl(q1[: self.toy.V], (self.m @ q1)[None].expand(self.toy.V, -1))


class MarginalChain:
    """The paper's model: the chain on tokens only, the state marginalised at every step."""

    def __init__(self, toy: Toy, kernel: Kernel, m: torch.Tensor) -> None:
        self.toy, self.kernel, self.m = toy, kernel, m
        self.Vk = toy.vocab
        self.joint = torch.tensor(list(itertools.product(range(self.Vk), repeat=toy.L)))
        self.latent = LatentChain(toy, kernel, m)

    def step_given_x0(self, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        """q(x_s = . | x_t = x, x_0 = v) ([N, vocab(x_0), vocab(x_s)]), state marginalised; x_t stays where it is
        impossible given v."""
        lat = self.latent
        R = reverse_probs(self.kernel, t, s)[0]
        out = torch.zeros(len(x), self.Vk, self.Vk, dtype=torch.float64)
        for v in range(self.Vk):
            post = local_likelihood(self.kernel, lat.state_of, lat.token_of, t)[:, v].view(lat.S, self.Vk)[:, x].T
            total = post.sum(1, keepdim=True)  # [N, 1]
            post = post / total.clamp_min(1e-300)
            onehot = torch.nn.functional.one_hot(torch.full((len(x),), v), self.Vk).double()
            for j in range(lat.S):
                local = j * self.Vk + x
                moved = lat.moves(onehot, local, R).view(len(x), lat.S, self.Vk).sum(1)
                out[:, v] += post[:, j : j + 1] * moved
            out[total.squeeze(1) == 0, v] = torch.nn.functional.one_hot(x[total.squeeze(1) == 0], self.Vk).double()
        return out

    def rows(self, denoise, t: float, s: float) -> list[torch.Tensor]:
        J = self.joint
        logits = self.kernel.constrain(denoise(J, torch.full((len(J),), t), None), J, None)
        p = torch.softmax(logits.double(), -1).nan_to_num(0.0)  # 0 rows at unreachable states
        return [torch.einsum("nv,nvy->ny", p[:, i], self.step_given_x0(J[:, i], t, s)) for i in range(self.toy.L)]

    def truth(self, v: int, i: int, t: float, s: float) -> torch.Tensor:
        return self.step_given_x0(self.joint[:, i], t, s)[:, v]

    def reach(self, t: float) -> torch.Tensor:
        return self.q_tokens(t)[:, self.joint]

    def prior(self) -> torch.Tensor:
        q1 = self.q_tokens(1.0)
        return _kl(q1[: self.toy.V], (self.m @ q1)[None].expand(self.toy.V, -1))

    def q_tokens(self, t: float) -> torch.Tensor:
        return torch.stack([self.kernel.probs(torch.tensor([v]), t)[0] for v in range(self.Vk)])  # [vocab, vocab]

    def initial(self) -> torch.Tensor:
        return independent(self.m @ self.q_tokens(1.0), self.toy.L)

    def x0_law(self, denoise, steps: int) -> torch.Tensor:
        law = run(self, denoise, steps)
        data = (self.joint < self.toy.V).all(1)
        out = torch.zeros(len(self.toy.seqs), dtype=torch.float64)
        return out.index_add_(0, self.toy.index(self.joint[data]), law[data])


class MarkovChain(MarginalChain):
    """The paper's model of a Markov kernel (mask, uniform): the chain on tokens whose step s -> t is the matrix
    Q[y, j] = q(x_t = j | x_s = y) = r 1[y = j] + (1 - r) nu(j), r = alpha_t / alpha_s, reversed by Bayes' rule."""

    def step_given_x0(self, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        """q(x_s = . | x_t = x, x_0 = v) ∝ q_s(x_s | v) Q[x_s, x] ([N, vocab(x_0), vocab(x_s)]); x_t stays where it is
        impossible given v."""
        alpha = self.kernel.schedule.alpha
        r = float(alpha(torch.tensor(t, dtype=torch.float64)) / alpha(torch.tensor(s, dtype=torch.float64)))
        Q = r * torch.eye(self.Vk, dtype=torch.float64) + (1 - r) * self.kernel.nu[None]
        joint = self.q_tokens(s)[None] * Q[:, x].T[:, None, :]  # [N, v, y]
        total = joint.sum(2, keepdim=True)
        stay = torch.nn.functional.one_hot(x, self.Vk).double()[:, None].expand_as(joint)
        return torch.where(total > 0, joint / total.clamp_min(1e-300), stay)


Chain = LatentChain | MarginalChain


def run(chain: Chain, denoise, steps: int) -> torch.Tensor:
    """Law of the joint state after ``steps`` uniform steps from t = 1 to 0 ([J])."""
    law = chain.initial()
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        rows = chain.rows(denoise, float(grid[k]), float(grid[k + 1]))
        trans = rows[0]
        for r in rows[1:]:
            trans = (trans[:, :, None] * r[:, None, :]).reshape(len(trans), -1)
        law = law @ trans
    return law


def bound(chain: Chain, denoise, steps: int) -> float:
    """The exact T-step ELBO (nats per sequence) of the chain: the prior KL plus every grid step's KL of the true
    reverse step from the model's, summed over every reachable state, dense per position (both sides factorise
    over positions given the state at t)."""
    toy = chain.toy
    total = float((toy.p[:, None] * chain.prior()[toy.seqs]).sum())
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    seqs = toy.seqs
    for k in range(1, steps + 1):
        t, s = float(grid[k]), float(grid[k - 1])
        model = chain.rows(denoise, t, s)
        local = chain.reach(t)  # [vocab, J, L]
        reach = torch.stack([local[seqs[:, i], :, i] for i in range(toy.L)]).prod(0)  # [sequences, J]
        kl = torch.zeros_like(reach)
        for i in range(toy.L):
            per_v = torch.stack([_kl(chain.truth(v, i, t, s), model[i]) for v in range(toy.V)])  # [V, J]
            kl += per_v[seqs[:, i]]
        total += float((toy.p[:, None] * torch.where(reach > 0, reach * kl, torch.zeros_like(kl))).sum())
    return total


def nll(toy: Toy, law: torch.Tensor) -> float:
    """Exact NLL (nats per sequence) of a model law of x_0 under the toy's data law."""
    return float(-(toy.p * law.clamp_min(1e-300).log()).sum())
