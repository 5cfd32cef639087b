"""Applications built on the library: the CPU demo (`hf-fam demo`) and the benchmark suite (`hf-fam bench`)."""
