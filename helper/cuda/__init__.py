"""CUDA sources (.cu) and the loader that compiles and caches them."""
