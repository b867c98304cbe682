"""Analyses over nnsight-av models: sinks, modality dominance (MDS), sink-column attention, plots."""

from .attention import ColumnSums, column_attention, column_attention_sums
from .attention import attention_lse, attention_with_lse, column_probs, column_sums
from .mds import MDSResult, SinkAnalysis, SinkSplit, mds_summary, modality_dominance, sink_analysis
from .plots import plot_mds_distribution, plot_mds_heatmap, plot_sink_mask
from .sinks import SinkResult, find_sink_dims, find_sinks, first_token_phi, phi, resolve_sink_dims
from .sinks import SINK_CRITERIA, select_global_sinks, sink_mask, sink_scores
from .sink_config import ASD_SINKS, SinkConfig
from .ablation import EncoderAblatedInputs, ablate, ablation_intervention, encoder_edit
from .options import letter_probs, option_probs, option_token_ids
from .dominance import DominanceResult, clip_dominance, dominance, dominance_label
from .tracing import DEFAULT_TOKEN_SETS, SITES, TOKEN_SETS, PatchRunner, TraceResult, causal_trace, rank_agreement
from .datasets import ClipRecord, InvalidRecord, check_dataset, read_dataset, write_dataset
from .runner import PipelineConfig, PipelineResult, analyze_batch, analyze_clip, analyze_clips, merge_shards, run_clips
from .runner import trace_dataset
from .batching import choose_batch_size
from .decoding import DecodeOutput, blank_modality, fmd_generate, greedy_generate, noised_features, vcd_generate
from .asd import ASDConfig, ASDOutput, asd_generate, asd_sink_sets, strength_schedule, strength_target
from .chair import ChairResult, Vocabulary, chair, example_vocabulary, load_vocabulary
from .evaluate import CaptionRecord, EvalResult, evaluate, read_caption_dataset, write_caption_dataset
from .controls import LengthControlResult, length_control, match_report, matched_random_positions, strata
from .asd_cost import ASDCostResult, asd_cost, mixed_letter_probs
