"""CHAIR: object hallucination in captions (Rohrbach et al., 2018), for audio-visual captions.

An *object mention* is a vocabulary word (or one of its synonyms) found in a caption. For each
caption the mentioned objects are compared with the clip's ground-truth objects:

- ``CHAIR_s`` = captions with at least one hallucinated object / captions;
- ``CHAIR_i`` = hallucinated objects / mentioned objects (lower is better for both).

Matching rules (documented choices):

- Text is lower-cased and split into words (letters, digits, apostrophes, hyphens kept inside
  words); possessive ``'s`` is dropped.
- Plurals: a word matches its singular form (``dogs`` -> ``dog``, ``puppies`` -> ``puppy``,
  ``foxes`` -> ``fox``, ``wolves`` -> ``wolf``, and irregular forms such as ``geese``,
  ``mice``, ``sheep``, ``people``, ``children``). The vocabulary is written in singular forms.
- Synonyms map to one canonical object (``puppy`` -> ``dog``); multi-word names
  (``guinea pig``, ``fire truck``) match as phrases, longest first, so ``guinea pig`` is not
  also a ``pig``. ``ignore`` phrases (e.g. ``hot dog``) are removed before matching.
- Repeated mentions: by default an object counts once per caption however often it is
  named (``a dog ... the dogs ... a puppy`` is one mention of ``dog``), as in the original
  CHAIR; ``per_mention=True`` counts every occurrence instead. Each occurrence is still
  listed in the per-caption details.
- Ground-truth objects go through the same normalisation (synonyms and plurals allowed).
  An object outside the vocabulary is never a mention, so it can be neither hallucinated
  nor correct. A corpus with no mention at all has ``CHAIR_i = 0``.
- Word sense is not resolved: a verb spelled like an object ("a rooster *crows*", "it *flies*")
  counts as a mention, as in the original CHAIR; list such phrases under ``ignore`` if they matter.

Vocabulary files are JSON: ``{"name": ..., "objects": {"dog": ["puppy", "hound"], ...},
"ignore": ["hot dog"]}``; `load_vocabulary` reads one, `example_vocabulary` the shipped
VGGSound-animals example (``nnsight_av/assets/chair/``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from nnsight_av.errors import InputError

from .plots import plot_chair
from .results import JsonResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["Vocabulary", "Mention", "CaptionChair", "ChairResult", "chair", "load_vocabulary", "example_vocabulary",
           "singular", "ASSETS"]

ASSETS = Path(__file__).resolve().parent.parent / "nnsight_av" / "assets" / "chair"

_IRREGULAR = {
    "geese": "goose", "mice": "mouse", "lice": "louse", "teeth": "tooth", "feet": "foot", "men": "man",
    "women": "woman", "children": "child", "people": "person", "oxen": "ox", "calves": "calf", "halves": "half",
    "wolves": "wolf", "knives": "knife", "leaves": "leaf", "lives": "life", "wives": "wife", "elves": "elf",
    "shelves": "shelf", "loaves": "loaf", "thieves": "thief", "hooves": "hoof", "cacti": "cactus", "fungi": "fungus",
    "octopi": "octopus", "dice": "die", "sheep": "sheep", "deer": "deer", "fish": "fish", "moose": "moose",
    "bison": "bison", "salmon": "salmon", "trout": "trout", "aircraft": "aircraft", "species": "species",
    "series": "series", "news": "news", "bus": "bus", "glass": "glass", "grass": "grass", "class": "class",
    "walrus": "walrus", "octopus": "octopus", "cactus": "cactus", "gas": "gas", "lens": "lens", "chaos": "chaos",
    "moss": "moss", "bass": "bass", "boss": "boss", "kiss": "kiss", "mess": "mess", "dress": "dress",
    "buses": "bus", "gases": "gas", "lenses": "lens", "shoes": "shoe", "canoes": "canoe", "cattle": "cattle",
}
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def singular(word: str) -> str:
    """The singular form of an English noun (rules plus a table of irregular forms).

    >>> [singular(w) for w in ["dogs", "puppies", "foxes", "wolves", "geese", "bus", "glass", "cat", "birds"]]
    ['dog', 'puppy', 'fox', 'wolf', 'goose', 'bus', 'glass', 'cat', 'bird']
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zes", "sses")):
        return w[:-2]
    if w.endswith("oes") and len(w) > 4:
        return w[:-2]
    return w[:-1]


def _words(text: str) -> list[tuple[str, int, int]]:
    """``(normalised word, start, end)`` for every word of ``text``."""
    out = []
    for match in _WORD.finditer(text.lower()):
        word = match.group(0)
        end = match.end()
        if word.endswith("'s"):
            word = word[:-2]
        out.append((singular(word), match.start(), end))
    return out


@dataclass
class Vocabulary:
    """Canonical objects with their synonyms (singular forms) and phrases to ignore.

    >>> vocab = Vocabulary({"dog": ["puppy"], "guinea pig": [], "pig": ["hog"]}, ignore=["hot dog"])
    >>> [m.canonical for m in vocab.find("A puppy, a guinea pig and a hot dog.")]
    ['dog', 'guinea pig']
    """

    objects: dict[str, list[str]]
    ignore: list[str] = field(default_factory=list)
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.objects:
            raise InputError("a CHAIR vocabulary needs at least one object")
        self._phrases: dict[tuple[str, ...], str] = {}
        for canonical, synonyms in self.objects.items():
            if not isinstance(canonical, str) or not canonical.strip():
                raise InputError(f"vocabulary object names must be non-empty strings, got {canonical!r}")
            for name in [canonical, *synonyms]:
                key = tuple(w for w, _, _ in _words(name))
                if not key:
                    raise InputError(f"vocabulary entry {name!r} (object {canonical!r}) has no words")
                other = self._phrases.get(key)
                if other is not None and other != canonical:
                    raise InputError(f"{name!r} is listed under both {other!r} and {canonical!r}")
                self._phrases[key] = canonical
        self._ignore = [tuple(w for w, _, _ in _words(p)) for p in self.ignore]
        self._longest = max(len(k) for k in self._phrases)

    @classmethod
    def from_words(cls, words: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None = None) -> "Vocabulary":
        synonyms = dict(synonyms or {})
        unknown = sorted(set(synonyms) - set(words))
        objects = {w: list(synonyms.get(w, [])) for w in words}
        for name in unknown:                    # a synonym list for a word not in `words` adds that object
            objects[name] = list(synonyms[name])
        return cls(objects)

    def canonical(self, name: str) -> str | None:
        """The canonical object a name (any form) stands for, or None if it is not in the vocabulary."""
        return self._phrases.get(tuple(w for w, _, _ in _words(name)))

    def find(self, caption: str) -> list["Mention"]:
        """Every object mention in ``caption``, left to right, longest phrase first."""
        words = _words(caption)
        keys = [w for w, _, _ in words]
        taken = [False] * len(words)
        for phrase in self._ignore:
            n = len(phrase)
            for i in range(len(words) - n + 1):
                if tuple(keys[i:i + n]) == phrase:
                    taken[i:i + n] = [True] * n
        mentions = []
        i = 0
        while i < len(words):
            if taken[i]:
                i += 1
                continue
            for n in range(min(self._longest, len(words) - i), 0, -1):
                if any(taken[i:i + n]):
                    continue
                canonical = self._phrases.get(tuple(keys[i:i + n]))
                if canonical is not None:
                    start, end = words[i][1], words[i + n - 1][2]
                    mentions.append(Mention(caption[start:end], canonical, start, end))
                    i += n
                    break
            else:
                i += 1
        return mentions

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "objects": self.objects, "ignore": self.ignore}


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read a vocabulary JSON file (``{"objects": {canonical: [synonyms]}, "ignore": [...]}``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no CHAIR vocabulary file at {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("objects"), dict):
        raise InputError(f"{path}: a CHAIR vocabulary is a JSON object with an 'objects' mapping")
    return Vocabulary({k: list(v) for k, v in data["objects"].items()}, list(data.get("ignore", [])),
                      data.get("name", path.stem))


def example_vocabulary() -> Vocabulary:
    """The shipped example: animal classes of VGGSound with common synonyms.

    >>> vocab = example_vocabulary()
    >>> vocab.canonical("puppies"), vocab.canonical("rooster")
    ('dog', 'chicken')
    """
    return load_vocabulary(ASSETS / "vggsound_animals.json")


@dataclass
class Mention:
    """One occurrence of a vocabulary object in a caption (``text`` as written, ``[start, end)`` in chars)."""

    text: str
    canonical: str
    start: int
    end: int
    hallucinated: bool = False


@dataclass
class CaptionChair:
    """Per caption: its mentions, the distinct mentioned objects, and which of them are hallucinated."""

    caption: str
    ground_truth: list[str]
    mentions: list[Mention]
    objects: list[str]
    hallucinated: list[str]
    unknown_ground_truth: list[str] = field(default_factory=list)

    @property
    def has_hallucination(self) -> bool:
        return bool(self.hallucinated)


@dataclass
class ChairResult(JsonResult):
    """``chair_s``, ``chair_i`` and the per-caption details (`CaptionChair`)."""

    chair_s: float
    chair_i: float
    captions: list[CaptionChair]
    num_mentions: int
    num_hallucinated: int
    per_mention: bool = False

    def to_frame(self) -> "pd.DataFrame":
        """One row per caption: caption, ground truth, mentioned objects, hallucinated objects."""
        import pandas as pd

        return pd.DataFrame([{"caption": c.caption, "ground_truth": c.ground_truth, "mentioned": c.objects,
                              "hallucinated": c.hallucinated, "has_hallucination": c.has_hallucination}
                             for c in self.captions])

    def summary(self) -> "pd.DataFrame":
        """One row: CHAIR_s, CHAIR_i, captions, mentions, hallucinated mentions."""
        import pandas as pd

        return pd.DataFrame([{"CHAIR_s": self.chair_s, "CHAIR_i": self.chair_i, "captions": len(self.captions),
                              "mentions": self.num_mentions, "hallucinated": self.num_hallucinated,
                              "per_mention": self.per_mention}])

    def plot(self, ax: Any = None) -> "Figure":
        """Objects named per caption, grounded vs hallucinated; see `analyses.plots.plot_chair`."""
        return plot_chair(self, ax)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ChairResult", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChairResult":
        captions = [CaptionChair(**{**c, "mentions": [Mention(**m) for m in c["mentions"]]}) for c in data["captions"]]
        return cls(data["chair_s"], data["chair_i"], captions, data["num_mentions"], data["num_hallucinated"],
                   data.get("per_mention", False))

    def __repr__(self) -> str:
        return (f"ChairResult(CHAIR_s={self.chair_s:.4f}, CHAIR_i={self.chair_i:.4f}, captions={len(self.captions)}, "
                f"mentions={self.num_mentions}, hallucinated={self.num_hallucinated})")

    def _repr_html_(self) -> str:
        return f"<b>{self!r}</b>" + self.to_frame().to_html(index=False)


def as_vocabulary(vocabulary: Any, synonyms: Mapping[str, Sequence[str]] | None) -> Vocabulary:
    """``vocabulary`` (a `Vocabulary`, a JSON path, a dict or None for the example) with ``synonyms`` merged in."""
    if isinstance(vocabulary, Vocabulary):
        if synonyms:
            merged = {k: list(v) for k, v in vocabulary.objects.items()}
            for name, extra in synonyms.items():
                merged.setdefault(name, [])
                merged[name] = list(dict.fromkeys([*merged[name], *extra]))
            return Vocabulary(merged, list(vocabulary.ignore), vocabulary.name)
        return vocabulary
    if isinstance(vocabulary, (str, Path)):
        return as_vocabulary(load_vocabulary(vocabulary), synonyms)
    if isinstance(vocabulary, Mapping):
        return as_vocabulary(Vocabulary({k: list(v) for k, v in vocabulary.items()}), synonyms)
    if isinstance(vocabulary, Iterable):
        return Vocabulary.from_words(list(vocabulary), synonyms)
    raise InputError(f"vocabulary must be a Vocabulary, a path, a mapping or a list of words, "
                     f"got {type(vocabulary).__name__}")


def chair(
    captions: Sequence[str],
    ground_truth_objects: Sequence[Sequence[str]],
    vocabulary: Any,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    *,
    per_mention: bool = False,
) -> ChairResult:
    """CHAIR_s and CHAIR_i of ``captions`` against each caption's ground-truth objects.

    ``vocabulary``: a `Vocabulary`, a JSON file path, a mapping ``{object: [synonyms]}`` or a
    list of object words; ``synonyms`` adds ``{object: [synonyms]}``. See the module text for
    plurals, phrases and repeated mentions (``per_mention``).

    >>> res = chair(["A puppy barks at two cats.", "A dog runs."], [["dog"], ["dog"]], ["dog", "cat"],
    ...             synonyms={"dog": ["puppy"]})
    >>> res.chair_s, res.chair_i, res.captions[0].hallucinated
    (0.5, 0.3333333333333333, ['cat'])
    """
    if isinstance(captions, str):
        raise InputError("captions must be a list of strings, not one string")
    if len(captions) != len(ground_truth_objects):
        raise InputError(f"{len(captions)} captions but {len(ground_truth_objects)} ground-truth object lists")
    vocab = as_vocabulary(vocabulary, synonyms)
    details: list[CaptionChair] = []
    total = hallucinated_total = flagged = 0
    for caption, truth in zip(captions, ground_truth_objects):
        if not isinstance(caption, str):
            raise InputError(f"each caption must be a string, got {type(caption).__name__}")
        if isinstance(truth, str):
            truth = [truth]
        canonical_truth = {vocab.canonical(t) for t in truth}
        unknown = [t for t in truth if vocab.canonical(t) is None]
        canonical_truth.discard(None)
        mentions = vocab.find(caption)
        for mention in mentions:
            mention.hallucinated = mention.canonical not in canonical_truth
        objects = list(dict.fromkeys(m.canonical for m in mentions))
        bad = [o for o in objects if o not in canonical_truth]
        if per_mention:
            total += len(mentions)
            hallucinated_total += sum(m.hallucinated for m in mentions)
        else:
            total += len(objects)
            hallucinated_total += len(bad)
        flagged += bool(bad)
        details.append(CaptionChair(caption, list(truth), mentions, objects, bad, unknown))
    chair_s = flagged / len(captions) if captions else 0.0
    chair_i = hallucinated_total / total if total else 0.0
    return ChairResult(chair_s, chair_i, details, total, hallucinated_total, per_mention)
