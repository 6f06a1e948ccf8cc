"""Property-based fuzz tests (hypothesis): every public op and module against the reference and an independent
implementation on random valid inputs, and a clear error naming the argument on invalid ones."""
