"""Checkpoint conversion: real-world SD-1.x layouts -> our model directory (`invedit convert`).

safeload.py reads untrusted files without running code, identify.py says what a checkpoint is and
reads a diffusers folder's configs, layouts.py holds the key maps, convert.py ties them together.
"""
