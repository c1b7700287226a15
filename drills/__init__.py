"""Reliability drills: scripts CI runs, each printing its figure."""
