"""SafeInfer's custom ops, each beside its torch reference: the fused Triton kernels
(steering, target projection, decoding mix) and the harm probe's read and verdicts."""
