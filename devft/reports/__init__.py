"""Run reports: report.md and plots of one run, comparison tables and plots of several (over seeds too)."""

from devft.reports.report import write_comparison, write_report
from devft.reports.runs import RunRecords, cost_to_target, read_run
from devft.reports.seed_comparison import write_seed_comparison

__all__ = ["RunRecords", "cost_to_target", "read_run", "write_comparison", "write_report", "write_seed_comparison"]
