"""nnsight_av/media.py: memory, durations, value ranges and odd paths, on small generated media."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import nnsight_av as nav
from nnsight_av.media import load_audio, load_image, load_video

REPO = Path(nav.__file__).resolve().parent.parent


def reference_sampling(path, fps):
    """The sampling rule written plainly: decode every frame, then the nearest one to each k / fps."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * stream.time_base))
        rate = float(stream.average_rate)
    duration = times[-1] - times[0] + 1 / rate
    count = max(1, int(np.floor(duration * fps + 1e-6)))
    offsets = np.asarray(times) - times[0]
    return np.stack([frames[int(np.argmin(np.abs(offsets - k / fps)))] for k in range(count)]), duration


@pytest.mark.parametrize("clip_fps,fps", [(8, 2.0), (25, 2.0), (25, 3.0), (3, 7.0), (8, 8.0)])
def test_streamed_sampling_picks_the_same_frames_as_decoding_everything(tmp_path, clip_fps, fps):
    path = nav.testing.write_mp4(tmp_path / "clip.mp4", seconds=3.0, fps=clip_fps, size=32, with_audio=False)
    expected, duration = reference_sampling(path, fps)
    video = load_video(path, fps)
    assert video.duration == pytest.approx(duration) and np.array_equal(video.frames, expected)
    assert np.array_equal(load_video(path, fps, max_frames=2).frames, expected[:2])


PROBE = textwrap.dedent("""
    import sys
    from nnsight_av.media import load_video

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))

    load_video(sys.argv[2], 2.0)                        # codecs loaded and warmed on a 1 s clip
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak RSS (VmHWM) to the current RSS
        handle.write("5")
    before = status("VmRSS")
    video = load_video(sys.argv[1], 2.0)
    print(status("VmHWM") - before, video.frames.nbytes, len(video.frames))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through Linux's /proc")
def test_video_memory_grows_with_the_frames_kept_not_the_frames_decoded(tmp_path):
    # 30 s at 25 fps, 192 px: 750 decoded frames (83 MB as RGB), of which 60 are kept at 2 fps (6.6 MB).
    clip = nav.testing.write_mp4(tmp_path / "long.mp4", seconds=30.0, fps=25, size=192, with_audio=False)
    warm = nav.testing.write_mp4(tmp_path / "warm.mp4", seconds=1.0, fps=25, size=192, with_audio=False)
    out = subprocess.run([sys.executable, "-c", PROBE, str(clip), str(warm)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, check=True)
    peak, kept, count = map(int, out.stdout.split())
    assert count == 60
    decoded_rgb = 750 * 192 * 192 * 3
    assert peak < 3 * kept + 16 * 2 ** 20, f"peak RSS grew {peak / 2 ** 20:.1f} MiB for {kept / 2 ** 20:.1f} MiB kept"
    assert peak < decoded_rgb / 3


@pytest.mark.parametrize("seconds,rate", [(4.0, 16000), (4.0, 24000), (3.3, 16000), (1.0, 16000)])
def test_aac_padding_is_trimmed_to_the_real_duration(tmp_path, seconds, rate):
    path = nav.testing.write_mp4(tmp_path / "clip.mp4", seconds=seconds)
    audio = load_audio(path, sampling_rate=rate)
    assert abs(len(audio) - seconds * rate) <= 1, f"{len(audio) / rate:.4f} s decoded from a {seconds} s clip"
    tone = nav.testing.synthetic_tone(seconds, rate)
    assert np.corrcoef(audio[2048:-2048], tone[2048:-2048])[0, 1] > 0.99  # trimmed at the end, not shifted


def test_a_4s_clip_gets_the_chunks_and_audio_tokens_of_4s(tiny, tmp_path):
    path = nav.testing.write_mp4(tmp_path / "clip.mp4", seconds=4.0, fps=8, size=64)
    from_file = tiny.prepare(video=path, text="x")
    from_arrays = tiny.prepare(video=load_video(path).frames, audio=nav.testing.synthetic_tone(4.0), text="x")
    assert len(from_file.spans.chunks) == len(from_arrays.spans.chunks)
    assert len(from_file.spans.audio) == len(from_arrays.spans.audio)


def test_wav_lengths_are_untouched(tmp_path):
    import soundfile

    samples = (np.random.default_rng(0).random(33_333) - 0.5).astype(np.float32)
    soundfile.write(str(tmp_path / "x.wav"), samples, 16000)
    np.testing.assert_allclose(load_audio(tmp_path / "x.wav"), samples, atol=2 ** -15)  # 16-bit PCM


@pytest.mark.parametrize("dtype,low,high", [(np.int16, -32768, 32767), (np.int32, -2 ** 31, 2 ** 31 - 1),
                                            (np.uint8, 0, 255)])
def test_integer_pcm_is_rescaled_to_unit_range(dtype, low, high):
    samples = np.array([low, 0 if dtype != np.uint8 else 128, high], dtype=dtype)
    audio = load_audio(samples)
    assert audio.dtype == np.float32
    assert audio[0] == -1.0 and audio[1] == 0.0 and 0.99 < audio[2] <= 1.0


@pytest.mark.parametrize("bad", [np.full(1600, np.nan, np.float32), np.array([0.1, np.inf, 0.2], np.float32),
                                 np.array([[0.0, np.nan], [0.0, 0.0]], np.float64)])
def test_non_finite_audio_is_refused(bad):
    with pytest.raises(nav.MediaError, match="NaN or infinite"):
        load_audio(bad)


def test_non_finite_audio_in_a_file_is_refused(tmp_path):
    import soundfile

    soundfile.write(str(tmp_path / "nan.wav"), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(nav.MediaError, match="all of them"):
        load_audio(tmp_path / "nan.wav")


def test_float_frames_in_unit_range_are_scaled_not_blackened():
    frames = nav.testing.synthetic_frames(1.0, 2, 16)
    video = load_video(frames.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(video.frames, frames)
    assert load_video(np.ones((1, 2, 2, 3))).frames.max() == 255
    assert np.array_equal(load_video(frames.astype(np.int64)).frames, frames)


@pytest.mark.parametrize("frames,pattern", [
    (np.full((2, 4, 4, 3), 12.0, np.float32), "must be in \\[0, 1\\]"),
    (np.full((2, 4, 4, 3), -0.1), "must be in \\[0, 1\\]"),
    (np.full((2, 4, 4, 3), np.nan, np.float32), "NaN or infinite"),
    (np.array([[[[0.5, np.inf, 0.5]]]]), "NaN or infinite"),
    (np.full((2, 4, 4, 3), 300, np.int32), "0..255"),
    (np.full((2, 4, 4, 3), -1, np.int16), "0..255"),
    (np.zeros((2, 4, 4, 3), bool), "uint8"),
    (np.zeros((0, 4, 4, 3), np.uint8), "empty"),
])
def test_frames_outside_a_known_range_are_refused(frames, pattern):
    with pytest.raises(nav.MediaError, match=pattern):
        load_video(frames)


@pytest.mark.parametrize("kwargs,pattern", [({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"),
                                            ({"fps": "2"}, "fps"), ({"max_frames": 0}, "max_frames")])
def test_bad_sampling_settings_are_refused(kwargs, pattern):
    with pytest.raises(nav.MediaError, match=pattern):
        load_video(np.zeros((2, 4, 4, 3), np.uint8), **kwargs)


@pytest.mark.parametrize("load", [load_video, load_audio, load_image])
def test_a_fifo_is_refused_at_once(tmp_path, load):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    outcome: list = []

    def target():
        try:
            load(fifo)
        except Exception as error:  # the test inspects it
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the test process can exit
        with open(fifo, "wb"):
            pass
        thread.join(5)
        pytest.fail(f"{load.__name__} blocked on a FIFO")
    assert isinstance(outcome[0], nav.MediaError) and "FIFO" in str(outcome[0])


@pytest.mark.parametrize("load", [load_video, load_audio, load_image])
def test_a_folder_is_refused(tmp_path, load):
    with pytest.raises(nav.MediaError, match="is a folder"):
        load(tmp_path)
