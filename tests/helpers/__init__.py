"""Test helpers that build real (tiny, random) models on the fly."""
