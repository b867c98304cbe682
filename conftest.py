"""Settings for every test and doctest: offline, quiet, few threads (CI has 2 cores)."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message=".*cap_pixels_per_frame.*")

import torch  # noqa: E402

# Tiny models: one intra-op thread per test process is fastest (the suite runs two processes).
torch.set_num_threads(1)
