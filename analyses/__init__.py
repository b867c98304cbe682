"""Analyses over nnsight-av models: sinks, modality dominance (MDS), sink-column attention, plots."""

from .attention import ColumnSums, column_attention, column_attention_sums
from .attention import attention_lse, attention_with_lse, column_probs, column_sums
from .mds import MDSResult, SinkAnalysis, SinkSplit, mds_summary, modality_dominance, sink_analysis
from .plots import plot_mds_distribution, plot_mds_heatmap, plot_sink_mask
from .sinks import SinkResult, find_sink_dims, find_sinks, first_token_phi, phi, resolve_sink_dims
from .sinks import select_global_sinks, sink_scores
