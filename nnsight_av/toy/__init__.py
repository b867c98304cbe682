"""The toy audio-visual world and the small Omni model trained on it (``nav.load("toy-omni")``).

>>> from nnsight_av import toy
>>> [e.name for e in toy.ENTITIES if e.identified_by == "audio"]
['bell', 'horn', 'bird', 'frog']
"""

from .dataset import (CAPTION_PROMPT, LETTERS, MC_QUESTION, OBJECT_WORDS, TASKS, ToyRecord, caption_for,
                      caption_objects, clip_seed, make_clip, make_dataset, mc_prompt, parse_caption, read_dataset,
                      write_dataset)
from .model import ASSET_DIR, DEFAULT_SYSTEM, PROCESSOR_KWARGS, TOY_WORDS, load_toy, toy_config, toy_processor, toy_tokenizer
from .world import (COLOURS, ENTITIES, ENTITY_NAMES, FPS, FRAME_SIZE, SAMPLE_RATE, SECONDS, SHAPES, SOUNDS, Entity,
                    entity, render_audio, render_frames)

__all__ = ["ToyRecord", "make_clip", "make_dataset", "write_dataset", "read_dataset", "mc_prompt", "caption_for",
           "caption_objects", "parse_caption", "clip_seed", "CAPTION_PROMPT", "MC_QUESTION", "LETTERS",
           "OBJECT_WORDS", "TASKS", "load_toy", "toy_processor", "toy_tokenizer", "toy_config", "ASSET_DIR",
           "DEFAULT_SYSTEM", "PROCESSOR_KWARGS", "TOY_WORDS", "Entity", "ENTITIES", "ENTITY_NAMES", "COLOURS",
           "SHAPES", "SOUNDS", "entity", "render_frames", "render_audio", "SECONDS", "FPS", "FRAME_SIZE",
           "SAMPLE_RATE"]
