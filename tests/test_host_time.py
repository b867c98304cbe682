"""Host work per forward (issue 17 item 4): what a trace and the fast runtime ask of the host.

A traced forward builds no KV cache unless asked, `AVModel.module_inputs` gives a raw module
call what a trace passes (media plan, cached positions, ready masks), and the runtime's
prefill (`interventions.runtime.Decoder`) uses it, so it makes no host sync either.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nnsight_av as nav
from interventions.runtime import Decoder
from nnsight_av.adapters.base import PLAN_KEY
from nnsight_av.errors import InputError
from nnsight_av.testing import synthetic_frames as frames
from nnsight_av.testing import synthetic_tone as tone
from nnsight_av.testing import watch_syncs


class OpCount(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return nav.testing.tiny_model(seed=0)


@pytest.fixture(scope="module")
def examples(model):
    return [model.prepare(video=frames(4.0, 2, 56), audio=tone(4.0), text="What is making the sound?"),
            model.prepare(video=frames(2.0, 2, 56), audio=tone(2.0), text="And this?")]


def reference(model, data):
    with torch.inference_mode():
        return model.raw()(**data, use_cache=False).logits


def traced(model, ex, **kwargs):
    counter = OpCount()
    with torch.inference_mode(), counter, model.trace(ex, **kwargs):
        logits = model.logits.save()
        cache = model.output.past_key_values.save()
    return logits, cache, counter.count


def test_a_trace_builds_no_kv_cache_unless_asked(model, examples):
    ex = examples[0]
    logits, cache, ops = traced(model, ex)
    asked_logits, asked_cache, asked_ops = traced(model, ex, use_cache=True)
    assert cache is None and asked_cache is not None and asked_cache.get_seq_length() == len(ex)
    assert torch.equal(logits, reference(model, ex.data)) and torch.equal(asked_logits, logits)
    # Every decoder layer's cache update is gone (a few ops each).
    assert ops <= asked_ops - 2 * model.num_layers, (ops, asked_ops)


def test_generate_still_uses_its_cache(model, examples):
    with torch.inference_mode(), model.generate(examples[1], max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    with torch.inference_mode():
        ref = model.raw().generate(**examples[1].data, max_new_tokens=3, do_sample=False)
    assert torch.equal(ids, ref)


def test_module_inputs_is_what_a_trace_passes(model, examples):
    ex = examples[0]
    kwargs = model.module_inputs(ex)
    assert kwargs[PLAN_KEY] is ex.plan and torch.equal(kwargs["position_ids"], ex.data["position_ids"])
    with torch.inference_mode(), watch_syncs(host=ex.plan.host_tensors()) as syncs:
        logits = model.raw()(**kwargs, use_cache=False).logits
    assert syncs.count == 0, syncs.summary()
    assert torch.equal(logits, reference(model, ex.data))


def test_module_inputs_of_a_list_is_the_batch_of_invokes(model, examples):
    kwargs = model.module_inputs(examples)
    assert kwargs["input_ids"].shape == (2, max(len(ex) for ex in examples)) and PLAN_KEY in kwargs
    with torch.inference_mode():
        logits = model.raw()(**kwargs, use_cache=False).logits
        with model.trace() as tracer:
            with tracer.invoke(examples[0]):
                first = model.logits.save()
            with tracer.invoke(examples[1]):
                second = model.logits.save()
    assert torch.equal(logits, torch.cat([first, second]))


def test_module_inputs_rejects_what_is_not_an_input(model):
    with pytest.raises(InputError, match="AVInputs"):
        model.module_inputs("a clip.mp4")
    with pytest.raises(InputError, match="at least one"):
        model.module_inputs([])


def test_runtime_prefill_makes_no_host_sync(model, examples):
    decoder = Decoder(model)
    ex = examples[0]
    data = decoder.data(ex)
    assert PLAN_KEY in data
    with torch.inference_mode(), watch_syncs(host=ex.plan.host_tensors()) as syncs:
        prefill = decoder.prefill(data)
    assert syncs.count == 0, syncs.summary()
    with torch.inference_mode():
        plain = decoder.prefill(decoder.data(dict(ex.data)))      # a dict has no plan: transformers' path
    assert torch.equal(prefill.logits, plain.logits)
    assert torch.equal(prefill.positions, plain.positions)
