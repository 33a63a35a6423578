"""Device plumbing of the stages, checked on the CPU: the device settings, their one-line errors, and samples that do
not depend on how the CPU was chosen (no test here needs a GPU; CUDA's absence or presence is simulated)."""

import dataclasses

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.__main__ import app
from semdlm.config import ConfigError, ModelConfig, SamplerConfig, parse_params
from semdlm.devices import resolve_device
from semdlm.kernels import masking
from semdlm.model import Denoiser
from semdlm.samplers import ancestral


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert resolve_device("auto", "sampler.device") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", "sampler.device") == torch.device("cuda", 0)
    assert resolve_device("auto", "train.device", index=1) == torch.device("cuda", 1)  # a rank's LOCAL_RANK
    assert resolve_device("cuda:1", "eval.device") == torch.device("cuda", 1)
    assert resolve_device("cpu", "eval.device") == torch.device("cpu")


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_one_line_error_naming_the_key(no_cuda, value):
    with pytest.raises(ConfigError, match=rf"^dispersion.device={value} but torch sees no CUDA device; use "
                                         r"dispersion.device=auto or cpu$"):
        resolve_device(value, "dispersion.device")


def test_a_gpu_index_beyond_the_machine_names_the_valid_range(one_gpu):
    with pytest.raises(ConfigError, match=r"eval.device=cuda:3 but torch sees 1 CUDA device\(s\); use eval.device="
                                         r"cuda:0 .. cuda:0"):
        resolve_device("cuda:3", "eval.device")


@pytest.mark.parametrize("section", ["sampler", "eval", "dispersion"])
@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", 0])
def test_a_bad_device_value_is_rejected_when_params_are_read(section, value):
    with pytest.raises(ConfigError) as e:
        parse_params({section: {"device": value}})
    assert str(e.value) == (f"{section}.device={value!r} is not a device; use auto (CUDA when available), cpu, "
                            "cuda or cuda:<index>")


@pytest.mark.parametrize(("command", "section"),
                         [(["sample", "-k", "mask"], "sampler"), (["dispersion"], "dispersion")])
def test_stage_on_cuda_without_a_gpu_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, no_cuda,
                                                                               command, section):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({section: {"device": "cuda"}}))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, command)
    assert res.exit_code == 2, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("error:")] == [
        f"error: {section}.device=cuda but torch sees no CUDA device; use {section}.device=auto or cpu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_evaluator_resolves_its_device_before_loading(no_cuda, tmp_path, monkeypatch):
    from pipeline import evaluator_lm as ev
    from semdlm.config import EvalConfig

    monkeypatch.chdir(tmp_path)  # no prepared evaluator here: the device error must come first
    with pytest.raises(ConfigError, match="^eval.device=cuda but"):
        ev.load(EvalConfig(device="cuda"))


def tiny_sampling() -> tuple[Denoiser, object, SamplerConfig]:
    torch.manual_seed(0)
    V, L = 12, 8
    model = Denoiser(V, L, ModelConfig(d_model=16, n_layers=1, n_heads=2), mask_id=V - 1).eval()
    return model, masking(V, V - 1), SamplerConfig(steps=6, num_samples=5, batch_size=3, seed=3)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_stage_sampling_on_the_cpu_is_the_library_sampler_with_a_cpu_generator(no_cuda, precision):
    """What the sample stage draws on device auto / cpu (any train.precision: the CPU runs float32) is what the
    library sampler draws from the plain model and torch.Generator() with the same seed: the pre-device samples."""
    from pipeline.sample import draw

    model, kernel, cfg = tiny_sampling()
    want = []
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for n in (3, 2):
            want += ancestral(model, kernel, cfg, n, 8, latent=False, generator=gen).ids.tolist()
    for value in ("auto", "cpu"):
        device = resolve_device(value, "sampler.device")
        got, *_ = draw(model, kernel, cfg, None, None, device, precision, False)
        assert got == want, value
    other, *_ = draw(model, kernel, dataclasses.replace(cfg, seed=4), None, None, torch.device("cpu"), precision,
                     False)
    assert other != want  # the comparison can fail: the seed matters
