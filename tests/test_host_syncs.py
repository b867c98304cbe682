"""No host<->device synchronisation in a prepared Qwen2.5-Omni forward (issue 17, item 4).

`nav.testing.watch_syncs` counts, on the CPU, every op that would make the host wait for the
GPU. A prepared input carries a media plan (`nnsight_av.adapters.media_plan`): with it a trace
(and a plain forward given `Adapter.forward_inputs`) performs none, and gives the same logits
as transformers' own path.
"""

import numpy as np
import pytest
import torch

import nnsight_av as nav
from nnsight_av.adapters.base import PLAN_KEY
from nnsight_av.adapters.media_plan import HOST_WORK, MediaPlan
from nnsight_av.testing import synthetic_frames as frames
from nnsight_av.testing import synthetic_tone as tone
from nnsight_av.testing import cuda_sync_calls, watch_syncs

IMAGE = np.random.default_rng(0).integers(0, 255, (80, 60, 3)).astype(np.uint8)
LAYOUTS = {
    "audio_in_video": dict(video=frames(4.0, 2, 56), audio=tone(4.0), text="What is making the sound?"),
    "audio_in_video_long": dict(video=frames(6.0, 2, 112, seed=1), audio=tone(5.0), text="Describe it"),
    "image": dict(images=[IMAGE], text="Describe"),
    "images_and_audio": dict(images=[IMAGE, IMAGE[:40]], audio=tone(1.0), text="Describe"),
    "video_and_separate_audio": dict(video=frames(4.0, 2, 56), audio=tone(3.0), text="x", use_audio_in_video=False),
    "audio_only": dict(audio=tone(3.0), text="What is it?"),
    "text_only": dict(text="What is making the sound?"),
}


# -- the detector ----------------------------------------------------------------------------

def test_watch_syncs_counts_what_waits_for_the_device():
    x = torch.arange(8)
    with watch_syncs() as syncs:
        x.tolist()
        x.sum().item()
        if x[3]:
            pass
        x.nonzero()
        x[x > 2]
        torch.unique(x)
        torch.repeat_interleave(x, x)
        torch.masked_select(x, x > 1)
        torch.equal(x, x)
    ops = [e.op for e in syncs.events]
    assert len(ops) == 9, syncs.summary()
    assert ops[0] == "Tensor.tolist" and "boolean mask" in ops[4]
    # The caller is reported (this file), not torch's internals.
    assert all(e.site.startswith("tests/test_host_syncs.py:") for e in syncs.events), syncs.summary()


def test_watch_syncs_ignores_asynchronous_ops():
    x = torch.arange(8.0)
    with watch_syncs() as syncs:
        y = (x * 2).cumsum(0)
        x.index_select(0, torch.tensor([1, 2]))
        x.repeat_interleave(torch.tensor([2] * 8), output_size=16)   # size given: no read of the repeats
        torch.zeros(8).masked_scatter(x > 3, x)                     # its size check runs on the device
        torch.tensor([], device=x.device)                            # nothing to copy
        _ = y.shape[0] + 1
    assert syncs.count == 0, syncs.summary()
    assert syncs.summary() == "no host syncs"


def test_watch_syncs_host_tensors_and_host_code():
    lengths = torch.tensor([3, 4])

    def host_work(n):
        return torch.arange(n).tolist()

    with watch_syncs(host=[lengths], host_code=[host_work]) as syncs:
        (lengths[1:] - lengths[:-1]).tolist()      # derived from a host tensor only
        host_work(3)
        torch.ones(2).tolist()                      # a device tensor: counted
    assert [e.op for e in syncs.events] == ["Tensor.tolist"], syncs.summary()
    with watch_syncs(device_only=True) as syncs:   # on a CPU nothing is on a device
        torch.arange(3).tolist()
    assert syncs.count == 0


# -- a prepared forward ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return nav.testing.tiny_model(seed=0, attn_implementation=request.param)


@pytest.fixture(scope="module")
def prepared(model):
    return {name: model.prepare(**kw) for name, kw in LAYOUTS.items()}


def transformers_logits(model, data):
    with torch.inference_mode():
        return model._module(**data, use_cache=False).logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prepared_trace_has_no_host_sync_and_the_same_logits(model, prepared, layout):
    ex = prepared[layout]
    assert isinstance(ex.plan, MediaPlan)
    with torch.inference_mode(), watch_syncs(host=ex.plan.host_tensors()) as syncs:
        with model.trace(ex, use_cache=False):
            logits = model.logits.save()
    assert syncs.count == 0, syncs.summary()
    assert torch.equal(logits, transformers_logits(model, ex.data))


def test_plain_forward_with_the_plan_has_no_host_sync(model, prepared):
    ex = prepared["audio_in_video"]
    kwargs = model.adapter.forward_inputs({**ex.data, PLAN_KEY: ex.plan})
    assert "attention_mask" not in kwargs or kwargs["attention_mask"].dim() == 4
    with torch.inference_mode(), watch_syncs(host=ex.plan.host_tensors()) as syncs:
        logits = model._module(**kwargs, use_cache=False).logits
    assert syncs.count == 0, syncs.summary()
    assert torch.equal(logits, transformers_logits(model, ex.data))
    # Without the plan the thinker runs transformers' own code, which the detector sees waiting.
    with torch.inference_mode(), watch_syncs() as syncs:
        model._module(**ex.data, use_cache=False)
    assert syncs.count >= 10
    assert any("get_audio_features" in e.site for e in syncs.events)


@pytest.mark.parametrize("pair", [("audio_in_video", "audio_in_video_long"), ("image", "images_and_audio"),
                                  ("audio_in_video", "audio_in_video")])
def test_batch_of_two_has_no_host_sync(model, prepared, pair):
    first, second = prepared[pair[0]], prepared[pair[1]]
    with torch.inference_mode(), watch_syncs(host_code=HOST_WORK) as syncs:
        with model.trace(use_cache=False) as tracer:
            with tracer.invoke(first):
                a = model.logits.save()
            with tracer.invoke(second):
                b = model.logits.save()
    assert syncs.count == 0, syncs.summary()
    # transformers' own batched forward of the same padded inputs.
    batch = model.adapter.collate([first.data, second.data], pad_id=model.tokenizer.pad_token_id)
    assert PLAN_KEY not in batch
    reference = transformers_logits(model, batch)
    assert torch.equal(torch.cat([a, b]), reference)


def test_plan_moves_index_tensors_and_keeps_lengths_on_the_host(prepared):
    ex = prepared["images_and_audio"]
    moved = ex.to("meta")
    assert moved.plan.device == torch.device("meta")
    assert all(t.device.type == "cpu" for t in moved.plan.host_tensors())
    assert moved.plan.audio.valid_indices.device.type == "meta"
    assert ex.plan.device == torch.device("cpu")          # the original is untouched


def test_a_plan_elsewhere_follows_the_model(model, prepared, monkeypatch):
    ex = prepared["images_and_audio"]
    # As if prepared for another device (no second device here): the plan reports one.
    monkeypatch.setattr(MediaPlan, "device", property(lambda self: torch.device("meta")))
    kwargs = model.adapter.forward_inputs({**ex.data, PLAN_KEY: ex.plan})
    assert kwargs[PLAN_KEY] is not ex.plan
    assert kwargs[PLAN_KEY].audio.valid_indices.device == torch.device("cpu")
    with torch.inference_mode(), model.trace(ex, use_cache=False):
        logits = model.logits.save()
    assert torch.equal(logits, transformers_logits(model, ex.data))


def test_a_plan_for_other_inputs_is_not_used(model, prepared):
    ex = prepared["audio_in_video"]
    kwargs = {**ex.data, PLAN_KEY: ex.plan}
    assert PLAN_KEY in model.adapter.forward_inputs(dict(kwargs))
    shorter = {**kwargs, "input_ids": kwargs["input_ids"][:, :-1], "attention_mask": kwargs["attention_mask"][:, :-1]}
    assert PLAN_KEY not in model.adapter.forward_inputs(shorter)
    other_audio = {**kwargs, "input_features": torch.cat([kwargs["input_features"]] * 2)}
    assert PLAN_KEY not in model.adapter.forward_inputs(other_audio)
    assert PLAN_KEY not in model.adapter.forward_inputs(dict(kwargs), generating=True)


def test_generate_with_a_planned_input_matches_transformers(model, prepared):
    ex = prepared["audio_in_video"]
    with model.generate(ex, max_new_tokens=3, do_sample=False) as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, model._module.generate(**ex.data, max_new_tokens=3, do_sample=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the synchronising CUDA calls")
@pytest.mark.parametrize("layout", ["audio_in_video", "images_and_audio"])
def test_gpu_trace_makes_no_synchronising_cuda_call(layout):
    model = nav.testing.tiny_model(seed=0)
    model._module.to("cuda")
    ex = model.prepare(**LAYOUTS[layout]).to("cuda")

    def trace():
        with torch.inference_mode(), model.trace(ex, use_cache=False):
            logits = model.logits.save()     # nnsight compiles the block: no `return` inside it
        return logits

    expected = trace()
    found = {}
    with watch_syncs(device_only=True) as syncs:
        cuda_syncs = cuda_sync_calls(lambda: found.setdefault("logits", trace()))
    assert not cuda_syncs and syncs.count == 0, (cuda_syncs[:3], syncs.summary())
    assert torch.equal(found["logits"], expected)


def _cuda_sync_calls(fn):
    """`cuda_sync_calls` of ``fn()``, with `watch_syncs`' summary of where they come from as the last entry."""
    with watch_syncs(device_only=True) as syncs:
        found = cuda_sync_calls(fn)
    return found + [syncs.summary()] if found else found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the synchronising CUDA calls")
def test_gpu_patched_runs_sync_once_per_forward_not_per_layer():
    """Causal tracing's clean record and batched skipping runs move their indices to the GPU without
    waiting for it (a pageable copy per layer would serialise the host and the GPU): the only sync of
    each forward is reading its letter probabilities."""
    from analyses import ablate
    from analyses.patching import PatchRunner
    from analyses.token_sets import Condition

    model = nav.testing.tiny_model(seed=0)
    model._module.to("cuda")
    clean = model.prepare(**LAYOUTS["audio_in_video"]).to("cuda")
    corrupt = ablate(clean, "video", model).to("cuda")
    runner = PatchRunner(model, "input_layernorm", list("AB"))
    layers = tuple(range(model.num_layers))
    audio = clean.spans.audio
    conds = [Condition("all", audio, layers), Condition("half", audio[::2], layers)]
    with torch.no_grad():
        record = runner.record_corrupt(corrupt, [0])
        runner.record_clean(clean, audio, layers)                          # warm-up
        corrupt_syncs = _cuda_sync_calls(lambda: runner.record_corrupt(corrupt, [0]))
        clean_syncs = _cuda_sync_calls(lambda: runner.record_clean(clean, audio, layers))
        found = {}
        run_syncs = _cuda_sync_calls(lambda: found.setdefault("probs", runner.run(
            runner.record_clean(clean, audio, layers), record, conds, batch_size=2)))
    assert len(clean_syncs) <= 2, clean_syncs                # the probabilities, not one per layer (+ summary)
    assert len(corrupt_syncs) <= 2, corrupt_syncs
    assert len(run_syncs) <= 3, run_syncs                    # clean record + one batched skipping forward (+ summary)
    assert found["probs"].shape == (2, 2)
