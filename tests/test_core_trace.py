"""Tracing the tiny Qwen2.5-Omni thinker: hidden states, batching, generation, remote simulation."""

import nnsight
import pytest
import torch

import nnsight_av as nav


def hf_forward(model, ex, **kwargs):
    with torch.no_grad():
        return model._module(**ex.data, output_hidden_states=True, **kwargs)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
def test_saved_hidden_states_equal_hf_output_hidden_states(fixture, request, av_example):
    model = request.getfixturevalue(fixture)
    ref = hf_forward(model, av_example)
    with torch.no_grad(), model.trace(av_example):
        inputs = nnsight.save([model.layers[i].input for i in range(model.num_layers)])
        last = model.final_norm.output.save()
        logits = model.logits.save()
    assert len(ref.hidden_states) == model.num_layers + 1
    for layer, saved in enumerate(inputs):
        assert saved.shape == (1, len(av_example), model.hidden_size)
        torch.testing.assert_close(saved, ref.hidden_states[layer], rtol=0, atol=0)
    torch.testing.assert_close(last, ref.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)


def test_layer_output_is_next_layer_input(tiny, av_example):
    with torch.no_grad(), tiny.trace(av_example):
        out0 = tiny.layers[0].output.save()
        in1 = tiny.layers[1].input.save()
    torch.testing.assert_close(out0, in1, rtol=0, atol=0)


def test_zeroing_a_span_changes_only_later_positions(tiny, av_example):
    video = av_example.spans.video
    with torch.no_grad():
        with tiny.trace(av_example):
            clean = tiny.logits.save()
        with tiny.trace(av_example):
            tiny.layers[1].output[:, video] = 0
            edited = tiny.logits.save()
    first = int(video.min())
    torch.testing.assert_close(edited[:, :first], clean[:, :first], rtol=0, atol=0)
    assert (edited[:, -1] - clean[:, -1]).abs().max() > 1e-4


def test_batched_invokes_of_different_lengths_equal_separate_runs(tiny, av_example, av_example_long):
    a, b = av_example, av_example_long
    assert len(a) != len(b)
    with torch.no_grad():
        with tiny.trace() as tracer:
            with tracer.invoke(a):
                hidden_a = tiny.layers[2].output.save()
                batch_a = tiny.logits.save()
            with tracer.invoke(b):
                batch_b = tiny.logits.save()
        with tiny.trace(a):
            alone_hidden_a = tiny.layers[2].output.save()
            alone_a = tiny.logits.save()
        with tiny.trace(b):
            alone_b = tiny.logits.save()
    torch.testing.assert_close(batch_a[:, : len(a)], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden_a[:, : len(a)], alone_hidden_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch_b[:, : len(b)], alone_b, rtol=0, atol=1e-5)


def test_edit_in_second_invoke_touches_only_that_input(tiny, av_example, av_example_long):
    a, b = av_example, av_example_long
    with torch.no_grad():
        with tiny.trace() as tracer:
            with tracer.invoke(a):
                batch_a = tiny.logits.save()
            with tracer.invoke(b):
                hidden = tiny.layers[1].output
                hidden[:, b.spans.audio] = 0
                batch_b = tiny.logits.save()
        with tiny.trace(a):
            alone_a = tiny.logits.save()
        with tiny.trace(b):
            tiny.layers[1].output[:, b.spans.audio] = 0
            alone_b = tiny.logits.save()
    torch.testing.assert_close(batch_a[:, : len(a)], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch_b[:, : len(b)], alone_b, rtol=0, atol=1e-5)


def test_batching_refuses_mixed_audio_in_video_flags(tiny, av_example):
    separate = tiny.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                            text="x", use_audio_in_video=False)
    with pytest.raises(nav.InputError, match="use_audio_in_video"):
        with torch.no_grad(), tiny.trace() as tracer:
            with tracer.invoke(av_example):
                tiny.logits.save()
            with tracer.invoke(separate):
                tiny.logits.save()


def test_generate_matches_hf_and_applies_interventions_every_step(tiny, av_example):
    with torch.no_grad():
        with tiny.generate(av_example, max_new_tokens=4) as tracer:
            ids = tracer.result.save()
        ref = tiny._module.generate(**av_example.data, max_new_tokens=4)
    torch.testing.assert_close(ids, ref)

    # Reference: a plain forward hook that scales the last layer's output at every step.
    layer = tiny.envoy_at(tiny.adapter.paths["layers"] + ".3")._module
    handle = layer.register_forward_hook(lambda module, args, out: out * 0.5)
    try:
        with torch.no_grad():
            hooked = tiny._module.generate(**av_example.data, max_new_tokens=4)
    finally:
        handle.remove()
    with torch.no_grad(), tiny.generate(av_example, max_new_tokens=4) as tracer:
        for _ in tracer.iter[0:4]:  # a bounded range: code after an unbounded [:] loop never runs
            tiny.layers[3].output = tiny.layers[3].output * 0.5
        traced = tracer.result.save()
    torch.testing.assert_close(traced, hooked)


def test_remote_local_simulation_serialises_the_trace(tiny, av_example):
    with torch.no_grad():
        with tiny.trace(av_example):
            local = tiny.logits.save()
        with tiny.trace(av_example, remote="local"):
            tiny.layers[0].output[:, av_example.spans.video] = 0
            simulated = tiny.logits.save()
        with tiny.trace(av_example):
            tiny.layers[0].output[:, av_example.spans.video] = 0
            edited = tiny.logits.save()
    torch.testing.assert_close(simulated, edited, rtol=0, atol=0)
    assert not torch.equal(simulated, local)


def test_standard_envoys_and_sizes(tiny):
    assert tiny.num_layers == 4 and tiny.hidden_size == 64 and tiny.num_heads == 4
    assert len(tiny.layers) == 4
    assert tiny.layers[-1].index == 3
    for role in ("embed", "final_norm", "lm_head", "audio_encoder", "vision_encoder"):
        assert getattr(tiny, role)._module is not None
    assert tiny.layers[0].input_layernorm._module is tiny.layers[0]._envoy._module.input_layernorm


def test_layer_index_out_of_range_is_a_clear_error(tiny):
    with pytest.raises(nav.LayerIndexError, match="out of range.*4 layers"):
        tiny.layers[4]
    with pytest.raises(nav.LayerIndexError):
        tiny.layers[-5]


def test_batched_generation_equals_separate_generation(tiny, av_example, av_example_long):
    with torch.no_grad():
        with tiny.generate(max_new_tokens=4) as tracer:
            with tracer.invoke(av_example):
                pass
            with tracer.invoke(av_example_long):
                pass
            with tracer.invoke():
                both = tracer.result.save()
        offsets = tiny.padding_offsets
        with tiny.generate(av_example, max_new_tokens=4) as tracer:
            alone_a = tracer.result.save()
        with tiny.generate(av_example_long, max_new_tokens=4) as tracer:
            alone_b = tracer.result.save()
    # batched generation pads on the left: the short input moved right by the length difference
    assert offsets == [len(av_example_long) - len(av_example), 0]
    torch.testing.assert_close(both[0, -4:], alone_a[0, -4:])
    torch.testing.assert_close(both[1, -4:], alone_b[0, -4:])
