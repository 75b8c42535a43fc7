"""Calibration data readers, observers and quantization recipes; see the quantization issue."""
