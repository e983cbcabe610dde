"""The shared vocabulary, imported by every process: the configuration, the modes, a
request's options, the safety vector and harm probe files, the mixing formula and the
checks against vLLM's internals. Nothing here starts an engine or serves HTTP."""
