"""Experiment scripts and configs that compose stepjax pieces."""
