from caption_tf.config import TextConfig
from caption_tf.data.text import END, START, CaptionVocabulary, clean_caption, wrap_caption


def test_cleaning_and_wrapping():
    assert clean_caption("  A Dog, running!  ") == "a dog running"
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
