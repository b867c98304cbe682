"""nav.load from a local folder, adapter selection and its errors."""

import json

import pytest
import torch

import nnsight_av as nav


def test_load_local_checkpoint_round_trip(tiny, av_example, tmp_path):
    tiny._module.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = nav.load(str(tmp_path), dtype=torch.float32, attn_implementation="sdpa",
                      processor_kwargs=tiny.processor_kwargs)
    assert loaded.adapter.name == "qwen2_5_omni"
    ex = loaded.prepare(video=av_example.request.video, audio=av_example.request.audio,
                        text=av_example.request.text, system=av_example.request.system)
    assert torch.equal(ex.input_ids, av_example.input_ids)
    with torch.no_grad():
        with loaded.trace(ex):
            a = loaded.logits.save()
        with tiny.trace(av_example):
            b = tiny.logits.save()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(nav.UnknownModelError, match="gpt2"):
        nav.load(str(tmp_path))
    with pytest.raises(nav.UnknownModelError, match="registered adapters"):
        nav.load(str(tmp_path), adapter="no_such_adapter")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(nav.UnknownModelError, match="existing folder"):
        nav.load(str(tmp_path / "nothing-here"))
