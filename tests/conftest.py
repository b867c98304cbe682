import pytest


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Qwen2.5-Omni thinker (sdpa, float32), shared read-only across tests."""
    import nnsight_av as nav

    return nav.testing.tiny_model("qwen2_5_omni", seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_eager():
    import nnsight_av as nav

    return nav.testing.tiny_model("qwen2_5_omni", seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def av_example(tiny):
    import nnsight_av as nav

    return tiny.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0),
                        text="What is making the sound?")


@pytest.fixture(scope="session")
def av_example_long(tiny):
    import nnsight_av as nav

    return tiny.prepare(video=nav.testing.synthetic_frames(6.0, 2, 112, seed=1),
                        audio=nav.testing.synthetic_tone(5.0, freq=300.0), text="Describe it")
