"""The harm probe's builder: its prompts, the states it reads, its fit, monitor and report."""
