from caption_tf.config import TextConfig
from caption_tf.data.text import END, START, CaptionVocabulary, clean_caption, wrap_caption


def test_cleaning_and_wrapping():
    assert clean_caption("  A Dog, running!  ") == "a dog running"
    assert clean_caption("  Arafed man, riding a HORSE's back.\n") == "arafed man riding a horse s back"
    assert clean_caption("a dog-sled (two dogs)!\t") == "a dog sled two dogs"
    assert clean_caption("Un cafe\u0301 près du lac") == clean_caption("UN CAFÉ PRÈS DU LAC") == "un café près du lac"
    assert wrap_caption("a b c d e f", max_length=5) == f"{START} a b c {END}"


def test_vocabulary_round_trip_and_limits(tmp_path):
    captions = ["a red circle", "a red square", "a blue circle", "a green triangle"]
    vocab = CaptionVocabulary.build(captions, TextConfig(vocab_size=7, max_length=6))
    assert vocab.size == 7  # pad, [UNK], <start>, <end> + 3 most frequent words
    assert vocab.tokens[4:] == ["a", "circle", "red"]  # frequency, then alphabetical
    ids = vocab.encode(["a red circle", "a green circle"])
    assert ids.shape == (2, 6)
    assert ids[0, 0] == vocab.start_id and ids[0, 4] == vocab.end_id and ids[0, 5] == 0
    assert vocab.decode(ids[0]) == "a red circle"
    assert vocab.decode(ids[1]) == "a [UNK] circle"  # out-of-vocabulary word
    vocab.save(tmp_path / "vocab.json")
    loaded = CaptionVocabulary.load(tmp_path / "vocab.json")
    assert loaded.tokens == vocab.tokens and loaded.fingerprint() == vocab.fingerprint()
    assert (loaded.encode(["a red circle"]) == ids[:1]).all()


def test_long_captions_keep_their_end_token():
    vocab = CaptionVocabulary.build(["one two three four five six seven"], TextConfig(max_length=5))
    ids = vocab.encode(["one two three four five six seven"])[0]
    assert list(ids).count(vocab.end_id) == 1 and ids[-1] == vocab.end_id


TRICKY = ["Un café, près du lac.", "a cafe\u0301 near_the pool", "A boy's T-shirt -- by the POOL!", "deux  chiens\tcourent"]


def test_the_vocabulary_and_the_metrics_split_words_the_same_way():
    from caption_tf.evaluation.metrics import tokenize, tokenize_captions

    vocab = CaptionVocabulary.build(TRICKY, TextConfig(vocab_size=100, max_length=16))
    for caption in TRICKY:
        words = vocab.decode(vocab.encode([caption])[0])
        assert "[UNK]" not in words.split()  # every training word is in the vocabulary, spelt as the metrics spell it
        assert words.split() == tokenize(caption)
    simple, _ = tokenize_captions({"c": TRICKY}, "simple")
    assert simple["c"] == [vocab.decode(vocab.encode([c])[0]) for c in TRICKY]
    assert tokenize(TRICKY[0])[1] == tokenize(TRICKY[1])[1] == "café" and "near" in tokenize(TRICKY[1])
