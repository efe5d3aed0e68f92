"""Measurements users run on their own machine: `picochat bench attention|train`."""
