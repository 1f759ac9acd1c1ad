"""Checkpoint conversion: real-world SD-1.x / SD-2.x layouts -> our model directory (`invedit convert`).

safeload.py reads untrusted files without running code, identify.py says what a checkpoint is and
reads a diffusers folder's configs, prediction.py decides eps vs v, layouts.py holds the key maps,
convert.py ties them together.
"""
