"""Named corpora (LM1B, OpenWebText, WikiText-103) from small local fixtures, sharded token outs, profiles."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import profile, sources, tokenize
from pipeline.artifacts import iter_split, load_rows, split_shards
from pipeline.common import load_params
from semdlm.config import DataConfig, parse_params
from semdlm.data import Packer, lm1b_detokenize, pack
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
    run_tokenize(tmp_path, monkeypatch, source="lm1b", path=str(tmp_path / "lm1b"), vocab="full")
    train, valid = decoded("train"), decoded("valid")
    assert "alpha" in train and "omega" not in train
    assert "omega" in valid and "alpha" not in valid


def test_openwebtext_holds_out_its_last_documents(tmp_path):
    texts = [f"web page {i} about " + " ".join(WORDS) for i in range(50)]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "owt.parquet")
    corpus = sources.open_corpus(DataConfig(source="openwebtext", path=str(tmp_path / "owt.parquet"),
                                            valid_fraction=0.1))
    assert list(corpus.splits["valid"]["text"]) == texts[45:]
    assert list(corpus.splits["train"]["text"]) == texts[:45]


def test_wikitext103_reads_a_save_to_disk_dataset_dict(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "", "c d"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["e f"]})})
    dd.save_to_disk(str(tmp_path / "wt"))
    corpus = sources.open_corpus(DataConfig(source="wikitext103", path=str(tmp_path / "wt")))
    assert [b for batch in corpus.batches("valid", 2) for b in batch] == ["e f"]
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
        outs[workers] = {s: load_rows(s) for s in ("train", "valid")}
    n_train = len(outs[1]["train"])
    assert n_train > 10 and len(split_shards("train")) == -(-n_train // 5)  # ceil(rows / 5) shards
    for s in ("train", "valid"):
        np.testing.assert_array_equal(outs[1][s], outs[2][s])


def test_streaming_packing_equals_packing_everything_at_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 100, rng.integers(1, 30)) for _ in range(40)]
    packer = Packer(16, 1, 2)
    streamed = np.concatenate([packer.push(docs[i : i + 3]) for i in range(0, 40, 3)])
    np.testing.assert_array_equal(streamed, pack(docs, 16, 1, 2))


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


@pytest.mark.parametrize("name", ["lm1b", "owt"])
def test_every_profile_value_says_whether_the_paper_gives_it(name):
    for line in (REPO / "params" / f"{name}.yaml").read_text().splitlines():
        if re.match(r"^\s+\w+:\s*[^#\s]", line):  # a leaf `key: value`
            assert re.search(r"#.*\b(paper|ours)\b", line, re.IGNORECASE), f"{name}.yaml: {line.strip()}"


def test_profiles_only_use_keys_of_params_yaml():
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("lm1b", "owt"):
        prof = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
        for sec, values in prof.items():
            if sec != "kernels":
                assert set(values) <= set(base[sec]), (name, sec, set(values) - set(base[sec]))
