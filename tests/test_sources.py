"""Named corpora (LM1B, OpenWebText, WikiText-103) from small local fixtures, sharded token outs, profiles."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import profile, sources, tokenize
from pipeline.artifacts import iter_split, load_rows, split_shards
from semdlm.config import ConfigError, DataConfig, load_params, parse_params, read_profile
from semdlm.data import Packer, bd3lm_lm1b_detokenize, lm1b_detokenize, pack
from semdlm.model import Denoiser
from tests.tiny import REPO, write_params

WORDS = ["markets", "football", "rates", "bank", "shares", "film", "music", "election", "weather", "science"]


def sentences(n: int, marker: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{marker} {i} : " + " ".join(rng.choice(WORDS, 12)) + " , it 's here ." for i in range(n)]


def run_tokenize(ws: Path, monkeypatch, **data) -> None:
    write_params(ws / "params.yaml", ws / "unused-evaluator", data={"seq_len": 16, "min_count": 1, **data})
    monkeypatch.chdir(ws)
    tokenize.run(load_params().data)


def decoded(split: str) -> str:
    from pipeline import assets
    from pipeline.artifacts import load_vocab

    ids = load_vocab().ids[np.concatenate([r.ravel() for r in iter_split(split)])]
    return assets.tokenizer().decode(ids.tolist())


def test_lm1b_uses_its_test_split_for_validation_and_detokenises(tmp_path, monkeypatch):
    for split, marker in (("train", "alpha"), ("test", "omega")):
        (tmp_path / "lm1b" / split).mkdir(parents=True)
        pd.DataFrame({"text": sentences(40, marker, 0)}).to_parquet(tmp_path / "lm1b" / split / "0000.parquet")
    corpus = sources.open_corpus(DataConfig(source="lm1b", path=str(tmp_path / "lm1b")))
    assert corpus.detokenize is lm1b_detokenize
    wrap = sources.open_corpus(DataConfig(source="lm1b", path=str(tmp_path / "lm1b"), packing="wrap"))
    assert wrap.detokenize is bd3lm_lm1b_detokenize  # BD3-LM's clean-up goes with its packing
    run_tokenize(tmp_path, monkeypatch, source="lm1b", path=str(tmp_path / "lm1b"), vocab="full")
    train, valid = decoded("train"), decoded("validation")
    assert "alpha" in train and "omega" not in train
    assert "omega" in valid and "alpha" not in valid


def test_openwebtext_holds_out_its_last_documents(tmp_path):
    texts = [f"web page {i} about " + " ".join(WORDS) for i in range(50)]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "owt.parquet")
    corpus = sources.open_corpus(DataConfig(source="openwebtext", path=str(tmp_path / "owt.parquet"),
                                            validation_fraction=0.1))
    assert list(corpus.splits["validation"]["text"]) == texts[45:]
    assert list(corpus.splits["train"]["text"]) == texts[:45]


def test_wikitext103_reads_a_save_to_disk_dataset_dict(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "", "c d"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["e f"]})})
    dd.save_to_disk(str(tmp_path / "wt"))
    corpus = sources.open_corpus(DataConfig(source="wikitext103", path=str(tmp_path / "wt")))
    assert [b for batch in corpus.batches("validation", 2) for b in batch] == ["e f"]
    assert len(corpus.splits["train"]) == 3


def test_missing_local_copy_of_a_named_corpus_is_a_clear_error(tmp_path):
    from pipeline.common import StageError

    with pytest.raises(StageError, match=r"data.source='lm1b': cannot load .*nowhere.*set data.path"):
        sources.open_corpus(DataConfig(source="lm1b", path=str(tmp_path / "nowhere")))


def test_shards_and_worker_processes_do_not_change_the_sequences(tmp_path, monkeypatch):
    texts = [f"story {i} : " + " ".join(np.random.default_rng(i).choice(WORDS, 20)) for i in range(60)]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "owt.parquet")
    monkeypatch.setattr(tokenize, "CHUNK_DOCS", 7)
    outs = {}
    for workers, shard in ((1, 100_000), (2, 5)):
        ws = tmp_path / f"w{workers}"
        ws.mkdir()
        run_tokenize(ws, monkeypatch, source="openwebtext", path=str(tmp_path / "owt.parquet"), workers=workers,
                     shard_sequences=shard)
        outs[workers] = {s: load_rows(s) for s in ("train", "validation")}
    n_train = len(outs[1]["train"])
    assert n_train > 10 and len(split_shards("train")) == -(-n_train // 5)  # ceil(rows / 5) shards
    for s in ("train", "validation"):
        np.testing.assert_array_equal(outs[1][s], outs[2][s])


@pytest.mark.parametrize("packing", ["cls_sep", "wrap"])
def test_streaming_packing_equals_packing_everything_at_once(packing):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 100, rng.integers(1, 30)) for _ in range(40)]
    packer = Packer(16, 1, 2, packing)
    streamed = np.concatenate([packer.push(docs[i : i + 3]) for i in range(0, 40, 3)])
    np.testing.assert_array_equal(streamed, pack(docs, 16, 1, 2, packing))


def test_wrap_packing_of_wikitext103_is_a_one_line_error():
    from pipeline.common import StageError

    with pytest.raises(StageError, match=r"^data.packing=wrap with data.source=wikitext103: .*use data.packing: "
                                         r"cls_sep$"):
        sources.open_corpus(DataConfig(source="wikitext103", packing="wrap"))


def test_unknown_packing_is_a_one_line_config_error():
    from semdlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.packing='nosuch' is unknown; use 'wrap' \(BD3-LM\) or 'cls_sep'$"):
        parse_params({"data": {"packing": "nosuch"}})


@pytest.mark.parametrize("packing", ["cls_sep", "wrap"])
def test_a_corpus_spelling_every_special_token_never_yields_a_special_id_but_the_packing(tmp_path, monkeypatch,
                                                                                          packing):
    docs = [f"story {i} says {s} and {s.lower()} here" for i in range(6)
            for s in ("[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]")]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    run_tokenize(tmp_path, monkeypatch, source=str(tmp_path / "corpus.txt"), vocab="full", packing=packing,
                 validation_fraction=0.2)
    rows = np.concatenate([load_rows("train"), load_rows("validation")])
    for special in (0, 100, 103):  # [PAD], [UNK], [MASK]: the packing never writes them
        assert not (rows == special).any(), special
    if packing == "wrap":
        assert (rows[:, 0] == 101).all() and (rows[:, -1] == 101).all() and not (rows == 102).any()
    assert "[ mask ]" in decoded("train")


def test_lm1b_detokenisation_rejoins_punctuation_clitics_and_urls():
    assert lm1b_detokenize("It 's here , he said .") == "It's here, he said."
    assert lm1b_detokenize("They did n't pay $ 5 ( about £ 3 ) !") == "They didn't pay $5 (about £3)!"
    assert lm1b_detokenize('see http : / / a.com / b " now "') == 'see http://a.com/b "now"'


@pytest.mark.parametrize(("name", "seq_len", "source"), [("lm1b", 128, "lm1b"), ("owt", 1024, "openwebtext")])
def test_paper_profiles_merge_into_valid_params(tmp_path, name, seq_len, source):
    path = REPO / "params" / f"{name}.yaml"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    merged = parse_params(profile.run(path, tmp_path / "params.yaml"))
    assert merged == load_params(tmp_path / "params.yaml")
    assert (merged.data.source, merged.data.seq_len, merged.train.steps) == (source, seq_len, 200_000)
    assert merged.eval.model == "gpt2-large" and merged.sampler.name == "blockwise"
    n = Denoiser(30522, seq_len, merged.model, 0).num_parameters()
    assert 100e6 < n < 120e6, n  # the paper's 110M-parameter model


# The values the paper states (arXiv 2606.15327), by profile and dotted key; a profile may label only these "paper".
_BOTH = {
    "train.steps": 200_000, "train.devices": 8,  # Sec. 5.1 "200K global steps", App. E.3 "8x NVIDIA A100"
    # App. E.1: "We adopt the small-scale architecture of arriola2025block" (BD3-LM small)
    "model.d_model": 768, "model.n_layers": 12, "model.n_heads": 12, "model.mlp_ratio": 4, "model.cond_dim": 128,
    # Sec. 4.2: alpha_t = 1 - t, beta_t = t^2 (Eq. 118 with alpha_min 0, beta 1, beta_max 1, eta 2)
    "kernels.semdlm_plus.alpha_min": 0.0, "kernels.semdlm_plus.beta": 1.0, "kernels.semdlm_plus.beta_max": 1.0,
    "kernels.semdlm_plus.eta": 2.0,
    "sampler.name": "blockwise", "sampler.strides": 2,  # Sec. 5.1 "semi-autoregressive sampler", "2" strides
    "sampler.steps": 128,  # Table 3: one of its step counts
    "eval.model": "gpt2-large",  # Sec. 5.1 "Generation PPL is measured by GPT-2-Large"
    # Tables 2-3's models: MDLM, the uniform D3PM and SemDLM+, each with a denoiser of x_t alone (Sec. 2, App. E.1)
    **{f"kernels.{k}.{key}": v for k in ("mask", "uniform", "semdlm_plus")
       for key, v in (("type", k), ("latent_state", False))},
}
PAPER_STATES = {
    "lm1b": {**_BOTH, "data.source": "lm1b", "data.seq_len": 128, "kernels.semdlm_plus.nu": "uniform"},
    # OWT: Table 3's entropy threshold is met by 1,024-token samples; Eq. 119's unigram nu
    "owt": {**_BOTH, "data.source": "openwebtext", "data.seq_len": 1024, "kernels.semdlm_plus.nu": "unigram",
            "eval.min_entropy": 4.8},
}


def labelled_leaves(path: Path) -> dict[str, tuple[object, str]]:
    """Dotted key -> (value, first word of its comment) for every leaf ``key: value  # comment`` of a profile."""
    leaves, parents = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)(\w+):\s*([^#]*?)\s*(?:#\s*(\w+)|$)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        parents = parents[:depth] + [m.group(2)]
        if m.group(3):
            leaves[".".join(parents)] = (yaml.safe_load(m.group(3)), (m.group(4) or "").lower())
    return leaves


@pytest.mark.parametrize("name", ["lm1b", "owt"])
def test_a_profile_labels_paper_exactly_the_values_the_paper_states(name):
    leaves = labelled_leaves(REPO / "params" / f"{name}.yaml")
    assert leaves and all(label in ("paper", "ours") for _, label in leaves.values()), leaves
    paper = {k: v for k, (v, label) in leaves.items() if label == "paper"}
    assert paper == {k: v for k, v in PAPER_STATES[name].items() if k in leaves}, (name, paper)


PROFILES = sorted(p.stem for p in (REPO / "params").glob("*.yaml"))


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_uses_only_keys_of_params_yaml_and_merges_into_valid_params(tmp_path, name):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    prof = read_profile(REPO / "params" / f"{name}.yaml")
    for sec, values in prof.items():
        if sec != "kernels":
            assert set(values) <= set(base[sec]), (name, sec, set(values) - set(base[sec]))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert parse_params(profile.run(REPO / "params" / f"{name}.yaml", tmp_path / "params.yaml"))


def test_a_profile_extends_its_base_and_its_own_values_win(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {source: bbcnews, seq_len: 64}\nkernels: {mask: {}, uniform: {}}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ndata: {seq_len: 128}\nkernels: {knn: {}}\n")
    assert read_profile(tmp_path / "child.yaml") == {"data": {"source": "bbcnews", "seq_len": 128},
                                                     "kernels": {"knn": {}}}
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match=r"'extends' loops through .*child\.yaml"):
        read_profile(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"params file .*nowhere\.yaml not found"):
        read_profile(tmp_path / "child.yaml")


@pytest.mark.parametrize("name", ["cpu-study", "gpu-quick"])
def test_the_bbc_studies_run_on_bbc_news_whatever_the_default_corpus(name):
    bbc, study = read_profile(REPO / "params/bbc.yaml"), read_profile(REPO / f"params/{name}.yaml")
    own = yaml.safe_load((REPO / f"params/{name}.yaml").read_text())
    assert study["data"]["source"] == "bbcnews" and "extends" not in study
    for sec, values in bbc.items():
        for key, value in values.items():
            assert study[sec][key] == own.get(sec, {}).get(key, value), (sec, key)
