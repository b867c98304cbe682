import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (tiny models run ~10x faster so on a shared CPU); restored afterwards.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_smol: needs SmolLM2-135M-Instruct's GGUF (fetched once per machine "
                                       "into the cache; the test is skipped, with the reason, when it cannot be had)")


@pytest.fixture(scope="session")
def smol_gguf():
    """Path of SmolLM2-135M-Instruct's GGUF, fetched at most once per machine (the cache is shared; xdist
    workers take a file lock, so only one downloads). Skips when it cannot be had; a checksum mismatch fails."""
    from nnsight_av.errors import WeightsChecksumError, WeightsUnavailableError
    from nnsight_av.smol import gguf_path

    try:
        return gguf_path(fetch=True)
    except WeightsChecksumError:
        raise
    except WeightsUnavailableError as error:
        pytest.skip(f"smol-omni weights unavailable: {error}")


@pytest.fixture(autouse=True)
def _requires_smol(request):
    if request.node.get_closest_marker("requires_smol") is not None:
        request.getfixturevalue("smol_gguf")


@pytest.fixture(scope="session")
def smol_model(smol_gguf):
    """smol-omni loaded once per session (loading costs tens of seconds); tests must not modify it."""
    import nnsight_av as nav

    return nav.load("smol-omni")
