"""Boundary policies (always-cheapest, always-priciest) and the difficulty taxonomy."""

from rlrouter.boundary.runs import BoundaryStats, boundary_runs, classify, taxonomy_counts

__all__ = ["BoundaryStats", "boundary_runs", "classify", "taxonomy_counts"]
