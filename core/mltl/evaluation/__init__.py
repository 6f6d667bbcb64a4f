"""Evaluation: metrics, bootstrap and DeLong, stage results, reports and reporters, and transferability ranking."""
