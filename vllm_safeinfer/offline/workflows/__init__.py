"""SafeInfer measured end to end: calibration, the demo and the evidence run."""
