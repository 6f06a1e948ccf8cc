"""Plain-PyTorch implementations of every op: the executable specification the kernels are tested against."""
