"""Sink diagnostics: metrics (torchmetrics), the probe, the `SinkMonitor` callback, plots, `sinks` CLI."""
from sinkfree.diagnostics.cli import sinks_main
from sinkfree.diagnostics.monitor import SinkMonitor
from sinkfree.diagnostics.probe import LayerProbe, Row, SinkStats, collect, compute_stats, probe_model

__all__ = ["LayerProbe", "Row", "SinkMonitor", "SinkStats", "collect", "compute_stats", "probe_model", "sinks_main"]
