"""Training metrics: routing health (`routing`), throughput and MFU (`throughput`), loggers (`loggers`).

`moe_lm.metrics.compare` (the `moe-lm compare` report) is not imported here: it pulls in matplotlib, which
training ranks do not need. Metric definitions, key names and reductions: docs/metrics.md.
"""

from moe_lm.metrics.loggers import (JsonlLogger, Logger, MultiLogger, WandbLogger, build_loggers,
                                    read_wandb_id)
from moe_lm.metrics.routing import (RoutingRecord, RoutingTracker, collapse_rate, dead_experts, diagnostics_metrics,
                                    drop_fraction, effective_experts, load_cv, load_shares, max_over_mean,
                                    mean_dist_entropy, per_token_mean)
from moe_lm.metrics.throughput import (GPU_PEAK_FLOPS, ThroughputMeter, flops_per_token,
                                       measure_cpu_peak_flops, mfu, peak_flops, peak_memory_gib)

__all__ = ["GPU_PEAK_FLOPS", "JsonlLogger", "Logger", "MultiLogger", "RoutingRecord", "RoutingTracker",
           "ThroughputMeter", "WandbLogger", "build_loggers", "collapse_rate", "dead_experts", "diagnostics_metrics",
           "drop_fraction", "effective_experts", "flops_per_token", "load_cv", "load_shares", "max_over_mean",
           "mean_dist_entropy", "measure_cpu_peak_flops", "mfu", "peak_flops", "peak_memory_gib", "per_token_mean",
           "read_wandb_id"]
