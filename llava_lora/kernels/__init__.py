"""CPU kernels for training: blocked eager attention and torch.compile-fused RMSNorm/SwiGLU."""
