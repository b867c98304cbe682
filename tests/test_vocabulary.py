"""One vocabulary: site names, modalities and their one-letter codes are defined once and mean one thing."""

from __future__ import annotations

import pytest

import interventions as ivs
from analyses.sinks import modality_codes
from analyses.tracing import SITES, canonical_site
from interventions.site import ALIASES, AMBIGUOUS, ROLES, canonical_role
from nnsight_av.spans import MODALITIES, MODALITY_CODES


def test_every_site_alias_resolves_the_same_everywhere():
    for alias, role in ALIASES.items():
        assert role in ROLES
        assert canonical_role(alias) == role
        if role in SITES:
            assert canonical_site(alias) == role
    assert canonical_role("attn_out") == "attn_output" and canonical_role("mlp_out") == "mlp_output"


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_ambiguous_residual_names_warn_and_keep_their_old_meaning(name):
    with pytest.warns(FutureWarning, match="ambiguous"):
        role = canonical_role(name)
    assert role == AMBIGUOUS[name]
    with pytest.warns(FutureWarning):
        assert canonical_site(name) == role
    with pytest.warns(FutureWarning):
        assert ivs.Site(name).role == role


def test_unknown_site_is_a_clear_error():
    with pytest.raises(ivs.site.InputError, match="unknown site 'attn_logits' for patching"):
        canonical_site("attn_logits")
    with pytest.raises(ivs.site.InputError, match="unknown site 'resid_mid'"):
        canonical_role("resid_mid")


def test_modality_codes_are_one_table(av_example):
    assert set(MODALITY_CODES) == set(MODALITIES) and len(set(MODALITY_CODES.values())) == len(MODALITIES)
    assert modality_codes(av_example) == av_example.layout()
    labels = av_example.spans.modality_of()
    assert av_example.layout() == "".join(MODALITY_CODES[m] for m in labels)
    assert ivs.MODALITIES is MODALITIES


# -- one sink config -----------------------------------------------------------------------------
def test_sink_config_defaults_follow_the_method_and_round_trip():
    from analyses import ASD_SINKS, SinkConfig
    from analyses.asd import ASDConfig
    from analyses.runner import PipelineConfig

    assert SinkConfig().k_divide == 2.0 and ASD_SINKS.k_divide == 3.0          # METHOD.md sections 5 and 6
    assert PipelineConfig().sinks == SinkConfig() and ASDConfig().sinks == ASD_SINKS
    config = SinkConfig(dims=[458, 2570], tau=25, k=100, split_rule="sign")
    assert SinkConfig.from_dict({**config.to_dict(), "criterion_added_later": "ratio"}) == config
    asd = ASDConfig(sinks=config, alpha=0.3)
    assert (asd.k_divide, asd.sink_dims, asd.tau, asd.split_rule) == (2.0, (458, 2570), 25.0, "sign")
    assert ASDConfig.from_dict(asd.to_dict()) == asd and "k_divide" not in asd.to_dict()
    assert ASDConfig.from_dict({"k_divide": 4, "tau": 2.0}).sinks == ASD_SINKS.with_(k_divide=4, tau=2.0)
    pipe = PipelineConfig(sink_dims=[0, 1], tau=2.0)
    assert pipe.sinks == SinkConfig(dims=(0, 1), tau=2.0) and pipe.to_dict()["sinks"]["dims"] == [0, 1]


@pytest.mark.parametrize("bad, match", [({"k_divide": 0}, "k_divide"), ({"split_rule": "median"}, "split_rule"),
                                        ({"k": -1}, "k must be"), ({"dims": "458"}, "dims")])
def test_bad_sink_settings_are_clear_errors(bad, match):
    from analyses import SinkConfig
    from analyses.asd import ASDConfig

    with pytest.raises(ivs.site.InputError, match=match):
        SinkConfig(**bad)
    if "k" not in bad and "dims" not in bad:
        with pytest.raises(ivs.site.InputError, match=match):
            ASDConfig(**bad)
