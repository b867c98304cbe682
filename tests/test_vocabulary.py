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
