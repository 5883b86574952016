"""Tokenizer: training, round trips, the on-disk cache and the `sinkfree tokenizer train` verb."""

import pytest

import sinkfree.data.tokenizer as tokmod
from sinkfree.data import (
    StdlibCorpus,
    get_or_train_tokenizer,
    load_tokenizer,
    special_token_ids,
    tokenizer_main,
    train_tokenizer,
)

TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox — naïve café ☕ jumps.\n\n\tTabs too.", "x" * 50]


def test_round_trip_and_specials():
    tok = train_tokenizer(TEXTS * 5, vocab_size=300, show_progress=False)
    assert tok.get_vocab_size() <= 300
    assert special_token_ids(tok) == {"bos": 0, "eos": 1, "pad": 2}
    for text in TEXTS + ["unseen ünïcödé 漢字 \r\n 🙂"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_cache_reuses_trained_tokenizer(tmp_path, monkeypatch):
    source = StdlibCorpus(max_documents=5)
    tok, path = get_or_train_tokenizer(source, 300, tmp_path, show_progress=False)
    assert path.is_file() and path.parent.parent == tmp_path / "tokenizers"
    mtime = path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(tokmod, "train_tokenizer", lambda *a, **k: calls.append(1))
    tok2, path2 = get_or_train_tokenizer(source, 300, tmp_path, show_progress=False)
    assert not calls and path2 == path and path.stat().st_mtime_ns == mtime
    assert tok2.to_str() == tok.to_str()
    # a different vocab size is a different cache entry
    assert tokmod.cached_tokenizer_path(source.spec(), 320, tmp_path) != path
    assert not list(path.parent.glob("*.tmp"))


def test_load_missing_names_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer.*nope"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        load_tokenizer(bad)


def test_cli_train(tmp_path, capsys):
    data = tmp_path / "a.txt"
    data.write_text("\n".join(TEXTS * 20))
    out = tmp_path / "out" / "tokenizer.json"
    assert tokenizer_main(["train", "--data", str(data), "--vocab-size", "280", "--output", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() <= 280 and tok.decode(tok.encode(TEXTS[1]).ids) == TEXTS[1]
    assert tokenizer_main(["train", "--data", str(tmp_path / "missing.txt"), "--output", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        tokenizer_main(["train", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--data", "--vocab-size", "--output", "--text-field", "--split", "--streaming", "--max-documents",
                "--max-bytes"):
        assert opt in help_text
