"""Shared configuration bases; the runnable configs live in the top-level `configs/`."""
