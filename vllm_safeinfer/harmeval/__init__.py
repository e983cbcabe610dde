"""HarmEval-style evaluation: judges, degeneration check, runs and reports."""
