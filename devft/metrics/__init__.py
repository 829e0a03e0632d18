"""Measurements of a run: memory sampling, per-round records and their files."""

from devft.metrics.memory import PeakMemory, current_rss_mb, lifetime_peak_rss_mb

__all__ = ["PeakMemory", "current_rss_mb", "lifetime_peak_rss_mb"]
