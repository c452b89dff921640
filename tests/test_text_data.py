"""Text datasets: the embedded canary corpus, .txt files, one-line errors, copies as members."""

import numpy as np
import pytest

from jaxmem import JaxmemError, load_dataset
from jaxmem.engine.trainer import members_from_keep
from jaxmem.text import BOS, EOS, make_canaries, make_text_dataset

def test_canaries_corpus_is_fixed_and_describes_its_secrets():
  ds = load_dataset("canaries")
  again = make_canaries()
  assert ds.fingerprint == again.fingerprint and ds.is_text and not ds.is_image
  secrets = ds.secrets
  assert secrets["space_size"] == 10 ** secrets["length"] == 10_000
  counts = sorted(e["copies"] for e in secrets["canaries"])
  assert counts == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]
  index = ds.secret_index()
  for entry in secrets["canaries"]:
    i = entry["index"]
    assert ds.canary[i] and ds.copies[i] == entry["copies"]
    assert ds.decode(ds.x_train[i]) == "my pin is " + " ".join(entry["secret"])
    assert index[i] == int(entry["secret"])  # the candidate's position in R is the number it spells
    assert ds.prefix_len[i] == 4  # BOS my pin is
  assert (index[~ds.canary] == -1).all()
  # a long tail: rare-template sentences hold words seen in no other sequence
  counts_per_token = np.bincount(ds.x_train.ravel(), minlength=ds.num_classes)
  singletons = [i for i in range(ds.num_train) if not ds.canary[i]
                and (counts_per_token[ds.x_train[i][ds.x_train[i] > EOS]] == 1).any()]
  assert len(singletons) >= 40
  # rows are distinct sequences; duplicates are counted in `copies`
  assert len({tuple(r) for r in ds.x_train}) == ds.num_train
  assert (ds.copies[~ds.canary] > 1).sum() == 6
  assert ((ds.x_train[:, 0] == BOS) & ((ds.x_train == EOS).sum(1) == 1)).all()


def test_txt_file_lines_become_byte_sequences_with_copies(tmp_path):
  path = tmp_path / "corpus.txt"
  lines = ["hello world", "hello world", "héllo", "", "x" * 70] + [f"line {i}" for i in range(18)]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  ds = load_dataset(str(path))
  assert ds.tokenizer == "byte" and ds.num_classes == 259 and ds.x_train.shape[1] == 64
  texts = [ds.decode(t) for t in ds.x_train]
  assert texts[0] == "hello world" and ds.copies[0] == 2 and texts[1] == "héllo"
  assert "x" * 62 in texts  # a 70-byte line is cut into a 62-byte and an 8-byte piece
  assert ds.num_train + ds.num_test == len(set(texts) | {ds.decode(t) for t in ds.x_test})


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"  \n\n", "is empty"), (b"caf\xe9 au lait\nok\n", "not UTF-8"),
    (b"only one line\n", "at least 2"),
])
def test_bad_txt_files_get_one_line_errors(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(JaxmemError, match=message) as info:
    load_dataset(str(path))
  assert "\n" not in str(info.value)


def test_missing_txt_and_too_long_sequences_are_errors(tmp_path):
  with pytest.raises(JaxmemError, match="does not exist"):
    load_dataset(str(tmp_path / "nope.txt"))
  with pytest.raises(JaxmemError, match="exceeds the context"):
    make_text_dataset("t", [[5, 6, 7]], [[5]], vocab=[str(i) for i in range(8)], tokenizer="word", seq_len=4)
  with pytest.raises(JaxmemError, match="must leave a suffix"):
    make_text_dataset("t", [[5, 6]], [[5]], vocab=[str(i) for i in range(8)], tokenizer="word", seq_len=6,
                      prefix_len=[3])  # BOS 5 6 EOS: a prefix of 3 leaves no text to extract
  with pytest.raises(JaxmemError, match="label noise"):
    load_dataset("canaries", label_noise=0.1)


def test_members_repeat_every_copy_of_a_member():
  keep = np.array([[True, False, True], [False, True, True]])
  members, counts = members_from_keep(keep, np.array([3, 1, 2]))
  np.testing.assert_array_equal(counts, [5, 3])
  assert sorted(members[0, :5]) == [0, 0, 0, 2, 2] and sorted(members[1, :3]) == [1, 2, 2]
