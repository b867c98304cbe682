"""CHAIR on hand-made captions with hand-computed values."""

import json

import pytest

import nnsight_av as nav
from analyses.chair import ASSETS, ChairResult, Vocabulary, chair, example_vocabulary, load_vocabulary, singular

VOCAB = {"dog": ["puppy", "hound"], "cat": ["kitten"], "bird": [], "guinea pig": [], "pig": ["hog"],
         "goose": [], "mouse": []}


def test_synonyms_plurals_and_repeats_by_hand():
    captions = [
        "A puppy and two dogs bark; the hound barks again.",   # dog x3 -> one object, correct
        "Two kittens chase some mice.",                         # cat correct, mouse hallucinated
        "Geese fly over a pig.",                                # goose correct, pig hallucinated
        "Nothing here is an animal.",                           # no mention
    ]
    truth = [["dog"], ["cats"], ["goose"], ["bird"]]
    res = chair(captions, truth, VOCAB)
    # objects per caption: {dog}, {cat, mouse}, {goose, pig}, {} -> 5 objects, 2 hallucinated, 2 of 4 captions
    assert res.chair_s == pytest.approx(2 / 4)
    assert res.chair_i == pytest.approx(2 / 5)
    assert (res.num_mentions, res.num_hallucinated) == (5, 2)
    first = res.captions[0]
    assert [m.text for m in first.mentions] == ["puppy", "dogs", "hound"]
    assert {m.canonical for m in first.mentions} == {"dog"} and first.objects == ["dog"]
    assert not any(m.hallucinated for m in first.mentions)
    assert res.captions[1].hallucinated == ["mouse"] and res.captions[2].hallucinated == ["pig"]
    second = res.captions[1]
    assert [(m.text, m.hallucinated) for m in second.mentions] == [("kittens", False), ("mice", True)]
    assert captions[1][second.mentions[1].start:second.mentions[1].end] == "mice"
    # every occurrence counted: 3 + 2 + 2 + 0 = 7 mentions, 2 hallucinated
    per = chair(captions, truth, VOCAB, per_mention=True)
    assert per.chair_i == pytest.approx(2 / 7) and per.chair_s == res.chair_s


def test_repeated_hallucination_counts_once_per_caption_unless_per_mention():
    res = chair(["A cat, another cat and a kitten near a dog."], [["dog"]], VOCAB)
    assert res.chair_i == pytest.approx(1 / 2)          # {cat, dog}: cat hallucinated
    per = chair(["A cat, another cat and a kitten near a dog."], [["dog"]], VOCAB, per_mention=True)
    assert per.chair_i == pytest.approx(3 / 4)          # cat, cat, kitten hallucinated; dog correct


def test_phrases_ignore_and_extra_synonyms():
    vocab = Vocabulary(VOCAB, ignore=["hot dog"])
    res = chair(["A guinea pig eats a hot dog next to a hog."], [["guinea pig"]], vocab)
    assert [m.canonical for m in res.captions[0].mentions] == ["guinea pig", "pig"]   # not pig twice, no dog
    assert res.captions[0].hallucinated == ["pig"]
    # synonyms= extends a vocabulary: "doggo" now means dog
    res = chair(["A doggo sleeps."], [["dog"]], ["dog", "cat"], synonyms={"dog": ["doggo"]})
    assert res.chair_i == 0.0 and res.captions[0].objects == ["dog"]
    # ground truth given by a synonym or a plural is normalised too
    assert chair(["A puppy."], [["hounds"]], VOCAB).chair_s == 0.0


def test_unknown_ground_truth_and_empty_corpus():
    res = chair(["A cat sleeps."], [["zebra"]], VOCAB)
    assert res.captions[0].unknown_ground_truth == ["zebra"] and res.captions[0].hallucinated == ["cat"]
    empty = chair(["No animals.", "Still none."], [["dog"], []], VOCAB)
    assert (empty.chair_s, empty.chair_i, empty.num_mentions) == (0.0, 0.0, 0)


def test_singular_forms():
    pairs = {"dogs": "dog", "puppies": "puppy", "foxes": "fox", "wolves": "wolf", "geese": "goose", "mice": "mouse",
             "sheep": "sheep", "bus": "bus", "glasses": "glass", "horses": "horse", "bees": "bee", "cat": "cat",
             "mosquitoes": "mosquito", "people": "person", "finches": "finch"}
    assert {w: singular(w) for w in pairs} == pairs


def test_shipped_example_by_hand():
    rows = [json.loads(line) for line in (ASSETS / "example_captions.jsonl").read_text().splitlines() if line]
    res = chair([r["caption"] for r in rows], [r["objects"] for r in rows], example_vocabulary())
    # per caption: {dog}; {cat, dog*}; {chicken, duck*, goose*}; {horse}; {frog}; {} ("hot dog" ignored)
    assert res.chair_s == pytest.approx(2 / 6)
    assert res.chair_i == pytest.approx(3 / 8)
    assert [c.hallucinated for c in res.captions] == [[], ["dog"], ["duck", "goose"], [], [], []]
    back = ChairResult.from_json(res.to_json())
    assert back.chair_i == res.chair_i and back.captions[2].mentions[0].text == res.captions[2].mentions[0].text
    assert list(res.to_frame().columns[:2]) == ["caption", "ground_truth"]


def test_vocabulary_file_and_errors(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"name": "tiny", "objects": {"dog": ["puppy"]}, "ignore": ["hot dog"]}))
    vocab = load_vocabulary(path)
    assert vocab.name == "tiny" and vocab.canonical("Puppies") == "dog"
    assert chair(["a puppy"], [["dog"]], path).chair_s == 0.0
    with pytest.raises(nav.InputError, match="listed under both"):
        Vocabulary({"dog": ["pup"], "seal": ["pup"]})
    with pytest.raises(nav.InputError, match="2 captions but 1"):
        chair(["a", "b"], [["dog"]], VOCAB)
    with pytest.raises(nav.InputError, match="list of strings"):
        chair("a dog", [["dog"]], VOCAB)
    with pytest.raises(nav.InputError, match="no CHAIR vocabulary file"):
        load_vocabulary(tmp_path / "missing.json")
