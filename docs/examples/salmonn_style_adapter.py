"""Worked example of docs/adapters.md: an adapter for a model built outside transformers.

The model is a tiny video-SALMONN-style AVLLM (`nnsight_av.adapters.salmonn_style_model`): an audio encoder
and a vision encoder whose projected outputs replace placeholder tokens in the input
embeddings of a Llama decoder. Its adapter is `nnsight_av.adapters.salmonn_style`. This
script wraps the model, validates the adapter, and runs every AVModel feature on it.

Run it with ``python docs/examples/salmonn_style_adapter.py``; the test suite runs ``main()``.
"""

from __future__ import annotations

import tempfile

import nnsight
import torch

import nnsight_av as nav
from nnsight_av.adapters.salmonn_style import SalmonnStyleAdapter
from nnsight_av.adapters.salmonn_style_model import SalmonnStyleModel, SalmonnStyleProcessor


def build_model() -> nav.AVModel:
    """Wrap an existing module and processor with the adapter, as you would your own model."""
    tiny = nav.testing.tiny_model("salmonn_style", seed=0)       # provides a module and a processor
    module: SalmonnStyleModel = tiny._module
    processor: SalmonnStyleProcessor = tiny.processor

    model = nav.AVModel(module, adapter=SalmonnStyleAdapter, processor=processor)
    return model


def main() -> dict:
    model = build_model()

    # Validate the adapter: every check by name, with pass/fail and a message.
    report = nav.testing.check_adapter(model)
    print(report)
    report.raise_for_failures()

    # Prepare an audio-visual prompt: frames at 2 fps and a 16 kHz wave.
    frames = nav.testing.synthetic_frames(4.0, 2, 64)
    wave = nav.testing.synthetic_tone(4.0)
    ex = model.prepare(video=frames, audio=wave, text="What is making the sound?")
    print(ex.layout())                    # V video, A audio, . text: V V V V A A per frame
    print(ex.spans.chunks)                # 2 s chunks from the frame and audio-window times

    # Trace: zero the audio of chunk 0 after layer 1, read post-rope q/k at layer 2.
    with torch.no_grad(), model.trace(ex):
        model.layers[1].output[:, ex.spans.chunks[0].audio] = 0
        args, kwargs = model.adapter.attention_call(model.layers[2].self_attn).inputs
        query, key = args[1].save(), args[2].save()
        logits = model.logits.save()

    # Two inputs in one forward, one invoke each.
    short = model.prepare(audio=nav.testing.synthetic_tone(2.0), text="Describe what you hear")
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(ex):
            first = model.logits.save()
        with tracer.invoke(short):
            second = model.logits.save()

    # Generation, reading the last layer's output at the newest position of each of 4 steps.
    with model.generate(ex, max_new_tokens=4, min_new_tokens=4, do_sample=False) as tracer:
        steps = nnsight.save([])
        for step in tracer.iter[0:4]:
            steps.append(model.layers[-1].output[:, -1])
        ids = tracer.result.save()

    # Save and load back: nav.load reads model_type "salmonn_style" from config.json.
    with tempfile.TemporaryDirectory() as folder:
        module: SalmonnStyleModel = model._module
        module.save_pretrained(folder)
        model.processor.save_pretrained(folder)
        loaded = nav.load(folder)
        with torch.no_grad(), loaded.trace(ex):
            reloaded = loaded.logits.save()

    return {"report": report, "example": ex, "query": query, "key": key, "logits": logits, "first": first,
            "second": second, "ids": ids, "steps": steps, "reloaded": reloaded, "model": model}


if __name__ == "__main__":
    main()
