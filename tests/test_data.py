"""Data: the embedded corpus, local files, packing modes, resumable loading and clear errors."""

import json

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sinkfree.data import StdlibCorpus, TextDataModule, bos_window_starts, resolve_source
from sinkfree.data.sources import is_val_document


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder per module so the tiny tokenizer is trained once."""
    return tmp_path_factory.mktemp("sinkfree_cache")


def make_dm(cache, **kw):
    """A small stdlib-corpus data module: 30 documents, a 300-token vocabulary."""
    args = dict(max_documents=30, vocab_size=300, seq_len=64, batch_size=4, cache_dir=str(cache), progress=False)
    args.update(kw)
    dm = TextDataModule(**args)
    dm.prepare_data()
    dm.setup()
    return dm


def test_stdlib_corpus_deterministic():
    docs = list(StdlibCorpus(max_documents=120).documents())
    assert docs == list(StdlibCorpus(max_documents=120).documents())
    names = [n for n, _ in docs]
    assert len(set(names)) == len(names) == 120 and all(t for _, t in docs)
    assert names[0].startswith("pydoc_topics/") and any(n.startswith("stdlib/") for n in names)
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    capped = list(StdlibCorpus(max_bytes=100_000).documents())
    assert sum(len(t.encode()) for _, t in capped[:-1]) < 100_000


def test_val_split_by_name_hash():
    names = [f"doc{i}" for i in range(2000)]
    val = [n for n in names if is_val_document(n, 0.1)]
    assert val == [n for n in names if is_val_document(n, 0.1)] and 120 < len(val) < 280
    assert not any(is_val_document(n, 0.0) for n in names)


def test_bos_window_starts():
    # documents of length 3, 10, 2, 4 (ends at 19); seq_len 4
    starts = bos_window_starts(np.array([0, 3, 13, 15]), 19, 4)
    # 0 eats [0,4) crossing into doc 1 -> next segment >= 4 is doc 1's chunk at 7; 7 -> 11; 11 -> 15 (doc 2 tail
    # skipped); 15 consumes [15,19)
    assert starts.tolist() == [0, 7, 11, 15]


def test_bos_packing_starts_at_documents(cache):
    dm = make_dm(cache, bos_at_doc_start=True)
    bos, L = dm.special_ids["bos"], dm.seq_len
    stream, ds = dm.train_dataset.stream, dm.train_dataset
    docs = stream.doc_starts
    ends = np.append(docs[1:], stream.n_tokens)
    tokens = np.asarray(stream.tokens)
    assert len(ds) > 10
    for i in range(len(ds)):
        ids = ds[i]["input_ids"].numpy()
        s = int(ds.starts[i])
        assert ids.shape == (L + 1,) and ids[0] == bos and (ids[1:] != bos).all()
        assert (ids[1:] == tokens[s: s + L]).all()
        d = np.searchsorted(docs, s, side="right") - 1  # document holding s
        assert (s - docs[d]) % L == 0 and s < ends[d]  # a document start, or a chunk of a long document
    assert set(docs.tolist()) & set(ds.starts.tolist())


def test_plain_packing_contiguous(cache):
    dm = make_dm(cache, bos_at_doc_start=False)
    ds, L = dm.train_dataset, dm.seq_len
    eos, bos = dm.special_ids["eos"], dm.special_ids["bos"]
    windows = [ds[i]["input_ids"].numpy() for i in range(len(ds))]
    assert all(w.shape == (L + 1,) for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]  # consecutive windows overlap by the one shifted token
    joined = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    assert (joined == np.asarray(ds.stream.tokens[: len(joined)])).all()
    assert (joined == eos).sum() >= 2 and not (joined == bos).any()
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() <= 300


def test_probe_batch(cache):
    dm = make_dm(cache)
    probe = dm.probe_batch(num_sequences=4, seq_len=32)
    assert probe.shape == (4, 32) and probe.dtype == torch.long
    assert (probe[:, 0] == dm.special_ids["bos"]).all()
    assert torch.equal(probe, make_dm(cache).probe_batch(num_sequences=4, seq_len=32))
    assert len({tuple(r.tolist()) for r in probe}) == 4


def test_local_files(tmp_path, cache):
    (tmp_path / "a.txt").write_text("plain text file one. " * 40)
    with open(tmp_path / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"body": f"json line {i} " * 10, "id": i}) + "\n" for i in range(20))
    pq.write_table(pa.table({"body": [f"parquet row {i} " * 10 for i in range(20)]}), tmp_path / "c.parquet")
    src = resolve_source([str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet")], "body")
    docs = list(src.documents())
    assert len(docs) == 41 and docs[1][0].endswith("b.jsonl#0") and docs[-1][1].startswith("parquet row 19")
    dm = TextDataModule(data=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")],
                        text_field="body", vocab_size=280, seq_len=16, batch_size=2, val_fraction=0.2,
                        cache_dir=str(cache), progress=False)
    dm.prepare_data()
    dm.setup()
    text = dm.tokenizer.decode(next(iter(dm.train_dataloader()))["input_ids"][0].tolist())
    assert any(w in text for w in ("plain", "json", "parquet", "row", "line", "file"))
    assert len(dm.val_dataset) > 0
    # a single .txt file gets train and val (split by tokens), whichever side its name hashes to
    for want_val in (False, True):
        name = next(f"one{i}.txt" for i in range(100) if is_val_document(str(tmp_path / f"one{i}.txt"), 0.3) == want_val)
        (tmp_path / name).write_text("plain text file one. " * 40)
        one = TextDataModule(data=str(tmp_path / name), vocab_size=280, seq_len=8, batch_size=2, val_fraction=0.3,
                             cache_dir=str(cache), progress=False)
        one.setup()
        assert len(one.val_dataset) > 0 and len(one.train_dataset) > 0


def test_code_folder_corpus(tmp_path, cache):
    """Source code and markup count as plain text (a folder of code is a corpus); a file matched twice is read once."""
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("def add(a, b):\n    return a + b\n" * 30)
    (pkg / "kern.h").write_text("static inline int add(int a, int b) { return a + b; }\n" * 30)
    (tmp_path / "pkg" / "README.md").write_text("# pkg\nAdds numbers.\n" * 30)
    (tmp_path / "pkg" / "data.bin").write_bytes(bytes(range(256)))
    root = str(tmp_path / "pkg")
    src = resolve_source([root + "/**/*.py", root + "/**/*.h", root, root + "/sub/mod.py"])
    names = [name for name, _ in src.documents()]
    assert names == [str(pkg / "mod.py"), str(pkg / "kern.h"), str(tmp_path / "pkg" / "README.md")]
    dm = TextDataModule(data=root, vocab_size=280, seq_len=16, batch_size=2, val_fraction=0.0,
                        cache_dir=str(cache), progress=False)
    dm.setup()
    text = dm.tokenizer.decode(next(iter(dm.train_dataloader()))["input_ids"][0].tolist())
    assert any(w in text for w in ("add", "return", "static", "numbers"))


def test_bad_inputs(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"data\.data.*{missing.name}"):
        TextDataModule(data=[str(missing)])
    with pytest.raises(FileNotFoundError, match=r"data\.data.*no file matches"):
        TextDataModule(data=str(tmp_path / "*.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"data\.data.*unsupported file type.*x\.csv.*\.txt, .*\.py, .*\.parquet"):
        TextDataModule(data=str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        TextDataModule(seq_len=1)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        TextDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data\.val_split"):
        TextDataModule(val_split="validation")
    (tmp_path / "rows.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(ValueError, match=r"data\.text_field.*'text'"):
        list(resolve_source(str(tmp_path / "rows.jsonl")).documents())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_matches_uninterrupted(cache, num_workers):
    args = dict(max_documents=8, seq_len=32, batch_size=32, num_workers=num_workers, seed=3)
    dm = make_dm(cache, **args)
    per_epoch = len(dm.train_dataset) // dm.batch_size
    assert 3 <= per_epoch <= 40
    loader = dm.train_dataloader()
    reference = [b["input_ids"] for _ in range(3) for b in loader]  # three uninterrupted epochs
    assert not torch.equal(reference[0], reference[per_epoch])  # each epoch has its own order

    for epochs_done, k in ((0, 2), (1, 1)):  # stop mid epoch 0; stop just after the epoch boundary
        first = make_dm(cache, **args).train_dataloader()
        seen = [b["input_ids"] for _ in range(epochs_done) for b in first]
        for batch in first:
            seen.append(batch["input_ids"])
            if len(seen) == epochs_done * per_epoch + k:
                break
        state = first.state_dict()
        fresh = make_dm(cache, **args).train_dataloader()
        fresh.load_state_dict(state)
        resumed = [b["input_ids"] for b in fresh]  # rest of the interrupted epoch
        resumed += [b["input_ids"] for b in fresh]  # and the whole next one
        got = seen + resumed
        assert len(got) == (epochs_done + 2) * per_epoch
        for a, b in zip(got, reference):
            assert torch.equal(a, b)


class _Recorder(L.LightningModule):
    """Records the batches it trains on; learns nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, i):
        self.seen.append(batch["input_ids"].clone())
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_sees_same_batches(cache, tmp_path):
    args = dict(max_documents=8, seq_len=32, batch_size=128, num_workers=1, val_fraction=0.0)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path), max_steps=9)
    full = _Recorder()
    L.Trainer(**kw).fit(full, make_dm(cache, **args))
    assert 9 > len(make_dm(cache, **args).train_dataset) // 128 > 5  # the run crosses an epoch boundary
    first = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)
    L.Trainer(callbacks=[ckpt], **kw).fit(first, make_dm(cache, **args))
    resumed = _Recorder()
    L.Trainer(**kw).fit(resumed, make_dm(cache, **args), ckpt_path=str(next((tmp_path / "ck").glob("*step=5.ckpt"))))
    got = first.seen[:5] + resumed.seen
    assert len(got) == 9 and all(torch.equal(a, b) for a, b in zip(got, full.seen))


def test_warns_when_max_steps_repeats_the_corpus(cache):
    dm = make_dm(cache)
    n = len(dm.train_dataset)

    class Trainer:
        max_steps, world_size, accumulate_grad_batches = 10 * n, 1, 1

    dm.trainer = Trainer()
    with pytest.warns(UserWarning, match="memorise"):
        dm._warn_if_repeated()
    Trainer.max_steps = max(1, n // dm.batch_size)  # about one epoch: silent
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm._warn_if_repeated()
