"""interventions/: malformed descriptions and out-of-range parameters are the library's errors.

Each hostile case below once raised a raw ``KeyError`` / ``TypeError`` / ``ValueError`` /
``SafetensorError`` (or was silently accepted); every one must now raise an
`NNsightAVError` whose message names the problem, before anything runs.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import pytest
import torch

import interventions as ivs
import nnsight_av as nav

GOOD = ivs.Zero(layers=[1], tokens="video").to_dict()


def _with(**changes):
    return {**GOOD, **changes}


def _compose(*children):
    return {"type": "Compose", "children": list(children)}


# (id, description, regex the message must match)
HOSTILE_DICTS = [
    ("not-a-dict", [1, 2], "no 'type' key"),
    ("none", None, "no 'type' key"),
    ("no-type", {"layers": [1]}, "no 'type' key"),
    ("type-not-str", {"type": 3}, "unknown intervention type"),
    ("type-list", {"type": ["Zero"]}, "unknown intervention type"),
    ("unknown-type", {"type": "Explode"}, "unknown intervention type 'Explode'"),
    ("unknown-key", _with(scale=3.0), "Zero has no parameter 'scale'"),
    ("typo-key", _with(layer=[1]), "no parameter 'layer'"),
    ("non-str-key", {**GOOD, 1: 2}, "no parameter 1"),
    ("site-unknown", _with(site="resdi_post"), "unknown site 'resdi_post'"),
    ("site-number", _with(site=3), "role must be a string"),
    ("site-attn-logits", _with(site="attn_logits"), "attn_logits"),
    ("layers-float", _with(layers=1.5), "layers must be"),
    ("layers-nan", _with(layers=math.nan), "layers must be"),
    ("layers-str", _with(layers="first"), "layers must be"),
    ("layers-list-float", _with(layers=[1, 2.5]), "layer indices must be ints"),
    ("layers-list-bool", _with(layers=[True]), "layer indices must be ints"),
    ("layers-range-missing-start-type", _with(layers={"start": "0", "stop": 2}), "start must be an int"),
    ("layers-range-inf-stop", _with(layers={"start": 0, "stop": math.inf}), "stop must be an int"),
    ("layers-range-step-zero", _with(layers={"start": 0, "stop": 4, "step": 0}), "step cannot be 0"),
    ("layers-range-extra-key", _with(layers={"start": 0, "stop": 4, "size": 2}), "unknown \\['size'\\]"),
    ("tokens-float", _with(tokens=1.5), "cannot use float"),
    ("tokens-dict", _with(tokens={"a": 1}), "cannot use dict"),
    ("tokens-list-float", _with(tokens=[1, 2.5]), "positions or names"),
    ("tokens-bool", _with(tokens=True), "cannot be a bool"),
    ("heads-on-resid", _with(heads=[0]), "heads= applies"),
    ("heads-float", {"type": "Zero", "site": "attn_output", "heads": [0.5]}, "head indices must be ints"),
    ("heads-empty", {"type": "Zero", "site": "attn_output", "heads": []}, "heads= is empty"),
    ("sets-list", _with(sets=[1, 2]), "sets must map names"),
    ("sets-str-positions", _with(sets={"s": "video"}), "must hold token positions"),
    ("sets-negative", _with(sets={"s": [-1]}), "position -1"),
    ("sets-huge", _with(sets={"s": [10 ** 30]}), "set 's' holds position"),
    ("sets-float", _with(sets={"s": [1.5]}), "positions or names"),
    ("allow-empty-str", _with(allow_empty="no"), "allow_empty must be True or False"),
    ("noise-scale-nan", {"type": "Noise", "scale": math.nan}, "Noise scale must be a finite number"),
    ("noise-scale-inf", {"type": "Noise", "scale": math.inf}, "finite"),
    ("noise-scale-negative", {"type": "Noise", "scale": -1.0}, "Noise scale must be >= 0"),
    ("noise-scale-str", {"type": "Noise", "scale": "big"}, "Noise scale must be a number"),
    ("noise-scale-none", {"type": "Noise", "scale": None}, "must be a number"),
    ("noise-std-nan", {"type": "Noise", "std": math.nan}, "Noise std must be a finite"),
    ("noise-std-negative", {"type": "Noise", "std": {"video": -0.1}}, "std\\['video'\\] must be >= 0"),
    ("noise-std-key", {"type": "Noise", "std": {"speech": 0.1}}, "must be modalities"),
    ("noise-std-list", {"type": "Noise", "std": [0.1]}, "Noise std must be a number"),
    ("noise-seed-float", {"type": "Noise", "seed": 1.5}, "Noise seed must be an integer"),
    ("noise-seed-negative", {"type": "Noise", "seed": -3}, "Noise seed must be >= 0"),
    ("noise-seed-huge", {"type": "Noise", "seed": 2 ** 70}, "Noise seed must be <"),
    ("boost-alpha-nan", {"type": "AttentionBoost", "keys": "video", "alpha": math.nan}, "alpha must be a finite"),
    ("boost-alpha-str", {"type": "AttentionBoost", "keys": "video", "alpha": "0.2"}, "alpha must be a number"),
    ("boost-mult-alpha", {"type": "AttentionBoost", "keys": "video", "alpha": -2, "mode": "multiplicative"},
     "alpha >= -1"),
    ("boost-mode-unknown", {"type": "AttentionBoost", "keys": "video", "mode": "additive"}, "mode must be one of"),
    ("boost-mode-list", {"type": "AttentionBoost", "keys": "video", "mode": ["pre_softmax"]}, "mode must be one of"),
    ("boost-no-keys", {"type": "AttentionBoost", "queries": "text"}, "needs keys="),
    ("knockout-site", {"type": "AttentionKnockout", "keys": "video", "site": "resid_post"}, "acts on the 'attn_logits'"),
    ("patch-invoke-str", {"type": "Patch", "source": {"invoke": "zero"}}, "invoke index\\) must be an integer"),
    ("patch-invoke-negative", {"type": "Patch", "source": {"invoke": -1}}, "must be >= 0"),
    ("patch-invoke-extra", {"type": "Patch", "source": {"invoke": 0, "path": "x"}}, "an invoke reference is"),
    ("patch-source-list", {"type": "Patch", "source": [0]}, "Patch source must be"),
    ("patch-source-bool", {"type": "Patch", "source": True}, "Patch source must be"),
    ("patch-ref-unknown-key", {"type": "Patch", "source": {"file": "x"}}, "unknown \\['file'\\]"),
    ("patch-ref-path-number", {"type": "Patch", "source": {"path": 3}}, "path must be a string"),
    ("patch-ref-unsaved", {"type": "Patch", "source": {"name": "clean", "path": None}}, "not saved to a file"),
    ("meanpatch-invoke", {"type": "MeanPatch", "means": {"invoke": 0}}, "MeanPatch means must be an ActivationCache"),
    ("meanpatch-missing-file", {"type": "MeanPatch", "means": {"path": "/no/such/means.safetensors"}},
     "no activation cache file"),
    ("compose-no-children", {"type": "Compose"}, "Compose needs 'children'"),
    ("compose-children-dict", {"type": "Compose", "children": {"type": "Zero"}}, "Compose needs 'children'"),
    ("compose-bad-member", _compose(GOOD, {"type": "Noise", "scale": math.nan}), "children\\[1\\]: Noise scale"),
    ("compose-member-not-dict", _compose(GOOD, "Zero"), "children\\[1\\]: not an intervention"),
    ("compose-nested-bad", _compose(_compose(GOOD, _with(layers={"start": 0, "stop": "4"})), GOOD),
     "children\\[0\\]: Compose children\\[1\\]: a layer range's stop must be an int"),
]


@pytest.mark.parametrize("data,pattern", [c[1:] for c in HOSTILE_DICTS], ids=[c[0] for c in HOSTILE_DICTS])
def test_hostile_dicts_raise_the_librarys_errors(data, pattern):
    with pytest.raises(nav.NNsightAVError, match=pattern):
        ivs.from_dict(data)


def test_the_hostile_cases_are_many_and_the_good_one_loads():
    assert len(HOSTILE_DICTS) >= 40
    assert ivs.from_dict(GOOD) == ivs.Zero(layers=[1], tokens="video")


@pytest.mark.parametrize("text", ["{", "", "nan", b"\xff\xfe", "[1, 2"])
def test_bad_json_is_a_format_error(text):
    with pytest.raises(nav.FormatError, match="not valid JSON|no 'type' key"):
        ivs.from_json(text)


def test_from_json_needs_a_string():
    with pytest.raises(nav.FormatError, match="JSON string"):
        ivs.from_json({"type": "Zero"})


def test_site_from_dict_refuses_malformed_dicts():
    with pytest.raises(nav.FormatError, match="must be a dict"):
        ivs.Site.from_dict(["resid_post"])
    with pytest.raises(nav.FormatError, match="unknown \\['layer'\\]"):
        ivs.Site.from_dict({"role": "resid_post", "layer": 1})
    assert ivs.Site.from_dict(ivs.Site("mlp", layers=range(1, 3)).to_dict()) == ivs.Site("mlp", layers=range(1, 3))


# --------------------------------------------------------------------------- safetensors payloads


def _safetensors_bytes(metadata: dict | None, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors if tensors is not None else {"resid_pre@0": torch.zeros(4, 2)}, metadata=metadata)


def _meta(**changes):
    meta = {"layout": [0, "", []], "kind": "mean", "by": "modality", "count": 2, "name": None, "meta": {}}
    meta.update(changes)
    return {"nnsight_av": json.dumps(meta)}


HOSTILE_FILES = [
    ("empty", lambda: b"", "cannot read an activation cache"),
    ("garbage", lambda: b"\x00garbage" * 20, "cannot read an activation cache"),
    ("huge-header-length", lambda: struct.pack("<Q", 1 << 60) + b"{}", "cannot read an activation cache"),
    ("truncated", lambda: _safetensors_bytes(_meta())[:-7], "cannot read an activation cache"),
    ("header-not-json", lambda: struct.pack("<Q", 8) + b"{{{{{{{{", "cannot read an activation cache"),
    ("no-metadata", lambda: _safetensors_bytes(None), "without nnsight_av metadata"),
    ("other-metadata", lambda: _safetensors_bytes({"format": "pt"}), "without nnsight_av metadata"),
    ("metadata-not-json", lambda: _safetensors_bytes({"nnsight_av": "{oops"}), "cannot read an activation cache"),
    ("metadata-list", lambda: _safetensors_bytes({"nnsight_av": "[1]"}), "not a JSON object"),
    ("metadata-missing-kind", lambda: _safetensors_bytes({"nnsight_av": json.dumps({"layout": [0, "", []]})}),
     "lacks kind"),
    ("layout-short", lambda: _safetensors_bytes(_meta(layout=[0, ""])), "layout must be"),
    ("layout-negative", lambda: _safetensors_bytes(_meta(layout=[-5, "", []])), "layout must be"),
    ("layout-chunks-str", lambda: _safetensors_bytes(_meta(layout=[3, "TTT", "ab"])), "layout must be"),
    ("kind-unknown", lambda: _safetensors_bytes(_meta(kind="median")), "kind must be"),
    ("by-unknown", lambda: _safetensors_bytes(_meta(by="speaker")), "does not fit"),
    ("count-zero", lambda: _safetensors_bytes(_meta(count=0)), "count must be a positive"),
    ("count-str", lambda: _safetensors_bytes(_meta(count="2")), "count must be a positive"),
    ("tensor-name", lambda: _safetensors_bytes(_meta(), {"weights": torch.zeros(2)}), "not named '<point>@<layer>'"),
    ("meta-not-dict", lambda: _safetensors_bytes(_meta(meta=[1])), "'meta' must be a JSON object"),
]


@pytest.mark.parametrize("payload,pattern", [c[1:] for c in HOSTILE_FILES], ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_cache_files_raise_format_errors(tmp_path, payload, pattern):
    path = tmp_path / "means.safetensors"
    path.write_bytes(payload())
    with pytest.raises(nav.FormatError, match=pattern):
        ivs.ActivationCache.load(str(path))
    with pytest.raises(nav.FormatError, match=pattern):  # the same through a saved intervention
        ivs.from_dict({"type": "MeanPatch", "means": {"name": None, "path": str(path)}})


def test_a_well_formed_file_still_loads(tmp_path):
    path = tmp_path / "means.safetensors"
    path.write_bytes(_safetensors_bytes(_meta()))
    cache = ivs.ActivationCache.load(str(path))
    assert cache.kind == "mean" and cache.by == "modality" and cache.keys() == ["resid_pre@0"]
    iv = ivs.from_dict({"type": "MeanPatch", "means": {"name": None, "path": str(path)}, "layers": 0})
    assert iv.means.path == str(path)


def test_a_directory_is_not_a_cache(tmp_path):
    with pytest.raises(nav.FormatError, match="no activation cache file"):
        ivs.ActivationCache.load(str(tmp_path))


# --------------------------------------------------------------------------- construction checks


@pytest.mark.parametrize("make,pattern", [
    (lambda: ivs.Noise(scale=float("nan")), "finite"),
    (lambda: ivs.Noise(scale=-0.5), ">= 0"),
    (lambda: ivs.Noise(std=float("inf")), "finite"),
    (lambda: ivs.Noise(std={"audio": float("nan")}), "finite"),
    (lambda: ivs.Noise(seed=0.5), "integer"),
    (lambda: ivs.AttentionBoost(keys="video", alpha=float("inf")), "finite"),
    (lambda: ivs.AttentionBoost(keys="video", alpha=None), "number"),
    (lambda: ivs.Zero(allow_empty=1), "True or False"),
    (lambda: ivs.Patch(source=-1), ">= 0"),
    (lambda: ivs.MeanPatch(means=0), "ActivationCache"),
    (lambda: ivs.window(0, 0), ">= 1"),
    (lambda: ivs.window(0, 2.5), "integer"),
    (lambda: ivs.Zero(layers=slice(0, 2.5)), "must be an int"),
], ids=lambda v: "" if callable(v) else v)
def test_constructors_check_every_number(make, pattern):
    with pytest.raises(nav.NNsightAVError, match=pattern):
        make()


def test_a_huge_layer_range_is_refused_before_it_is_expanded(tiny, av_example):
    iv = ivs.Zero(layers=range(10 ** 8), tokens="video")
    tracemalloc.start()
    try:
        with pytest.raises(nav.LayerIndexError, match="out of range: this model has 4 layers"):
            ivs.run(tiny, av_example, iv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB allocated to refuse a layer range"
    with pytest.raises(nav.LayerIndexError, match="out of range"):  # from JSON too, and a window
        ivs.run(tiny, av_example, ivs.from_dict(_with(layers={"start": 0, "stop": 10 ** 30})))
    with pytest.raises(nav.LayerIndexError, match="reach layer -9"):
        ivs.run(tiny, av_example, ivs.Zero(layers=range(-9, 0)))
    assert ivs.Site(layers=range(-2, 4)).layer_indices(tiny) == [0, 1, 2, 3]  # negative ends still count back


def test_generate_checks_its_step_settings_before_running(tiny, av_example):
    tracemalloc.start()
    try:
        with pytest.raises(nav.InputError, match="max_new_tokens must be >= 1"):
            ivs.generate(tiny, av_example, ivs.Zero(layers=0), max_new_tokens=0)
        with pytest.raises(nav.InputError, match="max_new_tokens must be an integer"):
            ivs.generate(tiny, av_example, ivs.Zero(layers=0), max_new_tokens=1e8)
        with pytest.raises(nav.InputError, match="a generation step must be an integer"):
            ivs.generate(tiny, av_example, ivs.Zero(layers=0), steps=[0.5])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20
