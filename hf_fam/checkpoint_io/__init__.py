"""Checkpoint files, read and written without building the model: what a folder holds (checkpoint), safetensors
as byte streams (safetensors_io), GGUF sources (gguf_source), the initial memory a converted checkpoint starts
with (fam_init), conversion (convert), `hf-fam inspect` / `verify` (inspection), model cards (cards) and
uploads to the Hub (publish)."""
